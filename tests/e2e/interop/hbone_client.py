#!/usr/bin/env python3
"""An HBONE client written independently of warren — Python's ssl module and the h2
package (PyPI) — speaking HBONE as Istio's ztunnel does: mutual TLS 1.3 with ALPN h2 to
the destination's port 15008, the server accepted only if its certificate carries the
expected SPIFFE ID, then one HTTP/2 CONNECT per connection (`:authority` = the original
destination, no `:scheme`/`:path`) with `forwarded`, `baggage` and `traceparent`.

It sends --bytes random bytes, ends its side, reads the echo to the end of the stream,
and prints one JSON line: {"status", "baggage" (the answer's), "sent", "received",
"echo_ok", "trace_id", "server_id"}. Exit status 0 when the tunnel was accepted and the echo was exact, 1
otherwise (the JSON says what happened), 2 for a TLS failure.
"""
import argparse
import json
import os
import secrets
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def split_host_port(value):
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def tls_connect(args):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # SPIFFE: no host names; the peer's identity is its URI SAN, checked below.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(args.ca)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(split_host_port(args.tunnel), timeout=10)
    tls = context.wrap_socket(raw)
    if tls.selected_alpn_protocol() != "h2":
        raise ssl.SSLError(f"ALPN negotiated {tls.selected_alpn_protocol()!r}, not h2")
    uris = [value for kind, value in tls.getpeercert().get("subjectAltName", ()) if kind == "URI"]
    if uris != [args.server_id]:
        raise ssl.SSLError(f"server presented {uris}, expected [{args.server_id!r}]")
    return tls, uris[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnel", required=True, help="ip:15008 of the destination")
    parser.add_argument("--authority", required=True, help="original destination ip:port")
    parser.add_argument("--forwarded-for", required=True, help="the original source ip")
    parser.add_argument("--server-id", required=True, help="expected SPIFFE ID of the server")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True, help="trust bundle (PEM)")
    parser.add_argument("--bytes", type=int, default=256 * 1024)
    parser.add_argument(
        "--baggage",
        default="k8s.namespace.name=legacy,service.name=python-hbone-client",
        help="the source workload's metadata, as ztunnel sends it",
    )
    args = parser.parse_args()

    try:
        tls, server_id = tls_connect(args)
    except (ssl.SSLError, OSError) as error:
        print(json.dumps({"tls_error": str(error)}))
        return 2

    # The h2 package insists on `:path` in every request, also CONNECT, where RFC 9113
    # §8.5 forbids it (and ztunnel refuses it): its outbound header check stays off.
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False
        )
    )
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    trace_id = secrets.token_hex(16)
    forwarded = args.forwarded_for
    if ":" in forwarded:
        forwarded = f'"[{forwarded}]"'
    conn.send_headers(
        stream,
        [
            (":method", "CONNECT"),
            (":authority", args.authority),
            ("forwarded", f"for={forwarded}"),
            ("baggage", args.baggage),
            ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),
        ],
    )
    tls.sendall(conn.data_to_send())

    payload = os.urandom(args.bytes)
    sent = 0
    finished = False  # END_STREAM sent
    status = None
    received = bytearray()
    ended = False

    def send_what_the_window_allows():
        nonlocal sent, finished
        while sent < len(payload):
            room = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if room <= 0:
                return
            chunk = payload[sent : sent + room]
            conn.send_data(stream, chunk)
            sent += len(chunk)
        if not finished:
            conn.end_stream(stream)
            finished = True

    result = {"trace_id": trace_id, "server_id": server_id}
    while not ended:
        try:
            data = tls.recv(65536)
        except (ssl.SSLError, OSError) as error:
            # TLS 1.3: a server that refuses our certificate says so (an alert) after the
            # client considers the handshake done, at the first read.
            result["tls_error"] = str(error)
            break
        if not data:
            result["error"] = "the server closed the connection"
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                answer = dict(event.headers)
                status = int(answer[":status"])
                result["baggage"] = answer.get("baggage")
                if status != 200:
                    ended = True
                    break
                send_what_the_window_allows()
            elif isinstance(event, h2.events.WindowUpdated) and status == 200:
                send_what_the_window_allows()
            elif isinstance(event, h2.events.DataReceived):
                received += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
            elif isinstance(event, h2.events.StreamReset):
                result["error"] = f"stream reset ({event.error_code})"
                ended = True
        tls.sendall(conn.data_to_send())
    conn.close_connection()
    try:
        tls.sendall(conn.data_to_send())
        tls.close()
    except OSError:
        pass

    echo_ok = status == 200 and bytes(received) == payload
    result.update(status=status, sent=sent, received=len(received), echo_ok=echo_ok)
    print(json.dumps(result))
    return 0 if echo_ok else 1


if __name__ == "__main__":
    sys.exit(main())
