"""Open many TCP connections to one address and send nothing: what an unauthenticated
client can do to a TLS listener (15008). Prints one JSON line once every connection has
been tried and the listener had time to answer — how many are still open and how many
were reset or refused — then holds the open ones until stdin closes (or --hold seconds).
"""
import argparse
import errno
import json
import resource
import select
import socket
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="ip:port")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to let the listener answer")
    parser.add_argument("--hold", type=float, default=60.0, help="most seconds to hold them")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = args.addr.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    sockets, failed_connect = [], 0
    for _ in range(args.count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, int(port)))
        except OSError:
            failed_connect += 1
            s.close()
            continue
        s.setblocking(False)
        sockets.append(s)
    time.sleep(args.settle)
    open_, reset = [], 0
    for s in sockets:
        try:
            data = s.recv(1, socket.MSG_PEEK)
            if data == b"":
                reset += 1  # closed by the server
                s.close()
            else:
                open_.append(s)
        except BlockingIOError:
            open_.append(s)
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                reset += 1
                s.close()
            else:
                raise
    print(json.dumps({"open": len(open_), "reset": reset, "failed_connect": failed_connect}), flush=True)
    select.select([sys.stdin], [], [], args.hold)
    for s in open_:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
