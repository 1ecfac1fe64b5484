"""A client status (CSDS) client on gRPC's own C core (Python grpcio), with hand-encoded
protobuf, so nothing of Filterplane's code reads or writes the messages. Asks over the
stream (every proxy, with contents) and over the unary call (node ids with a prefix, no
contents), and prints what it read as JSON. Usage: csds_client.py PORT PREFIX"""
import json
import sys

import grpc

from protowire import field, fields, varint

SERVICE = "/envoy.service.status.v3.ClientStatusDiscoveryService/"
CONFIG_STATUS = {0: "UNKNOWN", 1: "SYNCED", 2: "NOT_SENT", 3: "STALE", 4: "ERROR"}
CLIENT_STATUS = {0: "UNKNOWN", 1: "REQUESTED", 2: "DOES_NOT_EXIST", 3: "ACKED", 4: "NACKED", 5: "RECEIVED_ERROR", 6: "TIMEOUT"}


def first(fs, num, default=b""):
    return next((v for n, v in fs if n == num), default)


def decode_response(buf):
    """ClientStatusResponse -> [{node, configs: [...]}]."""
    proxies = []
    for num, cc in fields(buf):
        if num != 1:
            continue
        ccf = fields(cc)
        node = fields(first(ccf, 1))
        configs = []
        for n, g in ccf:
            if n != 3:
                continue
            gf = fields(g)
            error = fields(first(gf, 8))
            configs.append({
                "type_url": first(gf, 1).decode(),
                "name": first(gf, 2).decode(),
                "version": first(gf, 3).decode(),
                "has_content": any(n == 4 for n, _ in gf),
                "config_status": CONFIG_STATUS.get(first(gf, 6, 0)),
                "client_status": CLIENT_STATUS.get(first(gf, 7, 0)),
                "error": first(error, 3).decode(),
            })
        proxies.append({"node": first(node, 1).decode(), "configs": configs})
    return proxies


def main():
    port, prefix = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    ident = lambda b: b
    stream = channel.stream_stream(SERVICE + "StreamClientStatus", request_serializer=ident, response_deserializer=ident)
    responses = stream(iter([b""]), timeout=10)
    every = decode_response(next(responses))
    fetch = channel.unary_unary(SERVICE + "FetchClientStatus", request_serializer=ident, response_deserializer=ident)
    # node_matchers: [{node_id: {prefix: PREFIX}}], exclude_resource_contents: true
    request = field(1, field(1, field(2, prefix.encode()))) + varint(3 << 3) + varint(1)
    some = decode_response(fetch(request, timeout=10))
    print(json.dumps({"stream": every, "fetch": some}))


if __name__ == "__main__":
    main()
