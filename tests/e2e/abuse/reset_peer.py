"""One end of a TCP connection that ends with a reset, or that reports how the other end
ended it: `server` accepts one connection on --port, `client` dials --addr. With
--write N the end writes N bytes and then resets the connection (SO_LINGER 0); with
--read it reads until the end and prints {"end": "eof"|"reset", "bytes": N}. A server
prints {"listening": PORT} first.
"""
import argparse
import json
import socket
import struct
import sys


def finish(sock, args):
    if args.write is not None:
        sock.sendall(b"x" * args.write)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        print(json.dumps({"wrote": args.write}), flush=True)
        return
    total, end = 0, "eof"
    sock.settimeout(30)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            total += len(data)
    except ConnectionResetError:
        end = "reset"
    except socket.timeout:
        end = "timeout"
    print(json.dumps({"end": end, "bytes": total}), flush=True)
    sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--addr")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", type=int)
    what.add_argument("--read", action="store_true")
    args = parser.parse_args()
    if args.role == "server":
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", args.port))
        listener.listen(1)
        print(json.dumps({"listening": listener.getsockname()[1]}), flush=True)
        listener.settimeout(60)
        sock, _ = listener.accept()
        finish(sock, args)
    else:
        host, port = args.addr.rsplit(":", 1)
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except ConnectionResetError:
            # The server's reset can overtake the end of connect(): a reset all the same.
            print(json.dumps({"end": "reset", "bytes": 0}), flush=True)
            return 0
        finish(sock, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
