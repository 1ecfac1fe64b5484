"""An ADS client on gRPC's own C core (Python grpcio), with hand-encoded protobuf: opens
a SotW and a delta stream to Filterplane, subscribes to one extension config, ACKs the
SotW response and prints what it got. Usage: grpc_core_ads.py PORT NAME"""
import sys
import threading

import grpc

from protowire import field, fields, text

ECDS = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


def main():
    port, name = sys.argv[1], sys.argv[2]
    node = field(2, text(1, "grpc-core") + text(2, "grpc-core"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    done = threading.Event()
    requests = []
    cond = threading.Condition()

    def feed(first):
        yield first
        while not done.is_set():
            with cond:
                cond.wait(0.1)
                while requests:
                    yield requests.pop(0)

    sotw = channel.stream_stream(SERVICE + "StreamAggregatedResources")
    responses = sotw(feed(node + text(3, name) + text(4, ECDS)), timeout=20)
    first = next(responses)
    f = dict(fields(first))
    version, nonce = f[1].decode(), f[5].decode()
    assert f[4].decode() == ECDS, f
    assert name.encode() in first
    # ACK it, as Envoy would; the stream stays open.
    with cond:
        requests.append(text(1, version) + text(3, name) + text(4, ECDS) + text(5, nonce))
        cond.notify()
    print(f"sotw ok: version {version}, {len(first)} bytes")

    delta = channel.stream_stream(SERVICE + "DeltaAggregatedResources")
    d = next(delta(iter([field(1, text(1, "grpc-core-delta") + text(2, "grpc-core")) + text(2, ECDS) + text(3, name)]), timeout=20))
    names = [dict(fields(r)).get(3, b"").decode() for n, r in fields(d) if n == 2]
    assert names == [name], names
    print(f"delta ok: {names}")
    done.set()


if __name__ == "__main__":
    main()
