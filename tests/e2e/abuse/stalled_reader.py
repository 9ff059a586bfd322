"""An HBONE peer that asks for more than it reads, and the server it asks.

`source --port P` (in the destination pod) accepts connections and writes to each as
fast as it is read, forever, like a download; it prints {"listening": PORT} first.

`peer` (anywhere) dials --tunnel with mutual TLS, as `interop/hbone_client.py` does,
grants the server HTTP/2 windows of 2 GiB, sends --streams CONNECT requests to
--authority at once (before it has read the server's SETTINGS, so its own h2 library
does not hold them back), reads until every stream is answered (200) or refused, and
then never reads again. It prints {"accepted", "refused", "other"} and holds the
connection open until its stdin closes.
"""
import argparse
import json
import os
import selectors
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
from hbone_client import tls_connect  # noqa: E402

WINDOW = 2**31 - 1


def source(args):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(1024)
    listener.setblocking(False)
    print(json.dumps({"listening": listener.getsockname()[1]}), flush=True)
    chunk = b"x" * 65536
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_WRITE)
                continue
            try:
                key.fileobj.send(chunk)
            except BlockingIOError:
                pass
            except OSError:
                selector.unregister(key.fileobj)
                key.fileobj.close()


def peer(args):
    tls, _ = tls_connect(args)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False
        )
    )
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
    conn.increment_flow_control_window(WINDOW - 65535)
    streams = set()
    for _ in range(args.streams):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "CONNECT"),
                (":authority", args.authority),
                ("forwarded", f"for={args.forwarded_for}"),
            ],
        )
        streams.add(stream)
    tls.sendall(conn.data_to_send())

    accepted, refused, other = 0, 0, {}
    answered = set()
    deadline = time.monotonic() + 20
    tls.settimeout(1)
    while len(answered) < len(streams) and time.monotonic() < deadline:
        try:
            data = tls.recv(65536)
        except socket.timeout:
            continue
        if not data:
            other["closed"] = "the server closed the connection"
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id not in answered:
                answered.add(event.stream_id)
                status = dict(event.headers)[":status"]
                if status == "200":
                    accepted += 1
                else:
                    other[status] = other.get(status, 0) + 1
            elif isinstance(event, h2.events.StreamReset) and event.stream_id not in answered:
                answered.add(event.stream_id)
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    refused += 1
                else:
                    other[str(event.error_code)] = other.get(str(event.error_code), 0) + 1
        tls.sendall(conn.data_to_send())
    other["unanswered"] = len(streams) - len(answered)
    print(json.dumps({"accepted": accepted, "refused": refused, "other": other}), flush=True)
    # From here on nothing is read: the server's data piles up wherever it is allowed to.
    sys.stdin.read()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["source", "peer"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tunnel", help="ip:15008 of the destination")
    parser.add_argument("--authority", help="the source's ip:port")
    parser.add_argument("--forwarded-for", help="the peer's own ip")
    parser.add_argument("--server-id", help="expected SPIFFE ID of the server")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca", help="trust bundle (PEM)")
    parser.add_argument("--streams", type=int, default=512)
    args = parser.parse_args()
    if args.role == "source":
        return source(args)
    return peer(args)


if __name__ == "__main__":
    sys.exit(main())
