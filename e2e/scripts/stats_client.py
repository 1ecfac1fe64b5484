"""A metrics service (StreamMetrics) client on gRPC's own C core (Python grpcio), with
hand-encoded protobuf, so nothing of Filterplane's code writes the messages. Over mTLS
with the given client certificate, it streams COUNT messages claiming NODE, each with a
cumulative `http.ingress.downstream_rq_completed` counter, and prints the call's status
code name. Usage: stats_client.py PORT CA CERT KEY NODE COUNT"""
import struct
import sys

import grpc

from protowire import field

METHOD = "/envoy.service.metrics.v3.MetricsService/StreamMetrics"


def counter_family(name, value):
    # MetricFamily { name = 1, type = 3 (COUNTER = 0), metric = 4 { counter = 3 { value = 1 (double) } } }
    counter = bytes([0x09]) + struct.pack("<d", value)
    metric = field(3, counter)
    return field(1, name.encode()) + bytes([0x18, 0x00]) + field(4, metric)


def messages(node, count):
    identifier = field(1, field(1, node.encode()))  # Identifier { node { id } }
    for i in range(count):
        family = field(2, counter_family("http.ingress.downstream_rq_completed", float(i)))
        yield (field(1, identifier) if i == 0 else b"") + family


def main():
    port, ca, cert, key, node, count = sys.argv[1:7]
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read())
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        call = channel.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
        try:
            call(messages(node, int(count)), timeout=30)
            print("OK")
        except grpc.RpcError as e:
            print(e.code().name, e.details())


if __name__ == "__main__":
    main()
