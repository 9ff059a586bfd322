#!/usr/bin/env python3
"""An HBONE server written independently of warren — Python's ssl module and the h2
package (PyPI) — as a ztunnel node serves its port 15008: mutual TLS 1.3 with ALPN h2,
a client certificate required and its SPIFFE ID (URI SAN) read, one HTTP/2 CONNECT per
stream answered 200 (with the server workload's `baggage`, as ztunnel answers) and its
bytes echoed until the client ends its side.

It prints "listening" once bound, serves one connection, and prints one JSON line per
stream: {"authority", "forwarded", "traceparent", "baggage", "client_id", "status",
"bytes"}. A
request that is not a plain CONNECT (a `:scheme` or `:path`, no `:authority`) is answered
400, as ztunnel answers it.
"""
import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:15008")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True, help="trust bundle (PEM)")
    parser.add_argument(
        "--baggage",
        default="k8s.cluster.name=ambient,k8s.namespace.name=outside,k8s.deployment.name=python-hbone-server,service.name=python-hbone-server,service.version=v1",
        help="the baggage answered with a 200",
    )
    args = parser.parse_args()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(args.ca)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2"])

    host, _, port = args.listen.rpartition(":")
    listener = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
    print("listening", flush=True)
    raw, _ = listener.accept()
    raw.settimeout(20)
    tls = context.wrap_socket(raw, server_side=True)
    uris = [v for kind, v in tls.getpeercert().get("subjectAltName", ()) if kind == "URI"]
    client_id = uris[0] if len(uris) == 1 else None

    # CONNECT carries no `:path`, which the h2 package's inbound check would refuse
    # (RFC 9113 §8.5 forbids it there): that check stays off, and we check the request.
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=False
        )
    )
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    seen = {}
    open_streams = set()
    served = 0
    while served == 0 or open_streams:
        data = tls.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                plain_connect = (
                    headers.get(":method") == "CONNECT"
                    and ":authority" in headers
                    and ":scheme" not in headers
                    and ":path" not in headers
                )
                status = 200 if plain_connect and client_id else 400
                seen[event.stream_id] = {
                    "authority": headers.get(":authority"),
                    "forwarded": headers.get("forwarded"),
                    "traceparent": headers.get("traceparent"),
                    "baggage": headers.get("baggage"),
                    "client_id": client_id,
                    "status": status,
                    "bytes": 0,
                }
                answer = [(":status", str(status))]
                if status == 200:
                    answer.append(("baggage", args.baggage))
                conn.send_headers(event.stream_id, answer, end_stream=status != 200)
                if status == 200:
                    open_streams.add(event.stream_id)
                else:
                    print(json.dumps(seen.pop(event.stream_id)), flush=True)
                    served += 1
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in open_streams:
                    seen[event.stream_id]["bytes"] += len(event.data)
                    conn.send_data(event.stream_id, event.data)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in open_streams:
                conn.end_stream(event.stream_id)
                open_streams.discard(event.stream_id)
                print(json.dumps(seen.pop(event.stream_id)), flush=True)
                served += 1
            elif isinstance(event, h2.events.StreamReset):
                open_streams.discard(event.stream_id)
        tls.sendall(conn.data_to_send())
    tls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
