//! Client and server together over real HTTP/2: in-memory pipes (`tokio::io::duplex`) and
//! loopback TCP.
use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Barrier},
    task::JoinHandle,
    time::timeout,
};

use super::{
    serve, server::serve_with_handshake_timeout, Baggage, ConnectRequest, HboneError, HboneStream,
    InboundRequest, Pool, PoolConfig, PoolKey, REASON_HEADER,
};

const PIPE: usize = 256 * 1024;
const LIMIT: Duration = Duration::from_secs(10);

fn key(dst: &str) -> PoolKey {
    PoolKey {
        source: "spiffe://cluster.local/ns/demo/sa/client".into(),
        destination: "spiffe://cluster.local/ns/demo/sa/server".into(),
        dst_ip: dst.parse().unwrap(),
    }
}

fn request(authority: &str, from: &str, id: &str) -> ConnectRequest {
    ConnectRequest {
        authority: authority.parse().unwrap(),
        connection_id: id.into(),
        forwarded_for: from.parse().unwrap(),
        baggage: Baggage::default(),
    }
}

/// Deterministic bytes that differ at every offset (xorshift), so a reordered or dropped
/// chunk shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A peer agent reached over in-memory pipes: each dial spawns `serve` on a new pipe.
struct Peer<H> {
    handler: H,
    dials: AtomicUsize,
    servers: Mutex<Vec<JoinHandle<Result<(), HboneError>>>>,
}

impl<H, Fut> Peer<H>
where
    H: Fn(InboundRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn new(handler: H) -> Arc<Self> {
        Arc::new(Peer {
            handler,
            dials: AtomicUsize::new(0),
            servers: Mutex::new(Vec::new()),
        })
    }

    fn dialer(self: &Arc<Self>) -> impl FnOnce() -> DialFuture {
        let peer = Arc::clone(self);
        move || {
            peer.dials.fetch_add(1, Ordering::SeqCst);
            let (client, server) = tokio::io::duplex(PIPE);
            let task = tokio::spawn(serve(server, peer.handler.clone()));
            peer.servers.lock().unwrap().push(task);
            std::future::ready(Ok(client))
        }
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }

    fn kill(&self) {
        for task in self.servers.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

type DialFuture = std::future::Ready<io::Result<DuplexStream>>;

/// Accepts and echoes until the client ends its side, then ends ours.
async fn echo(request: InboundRequest) {
    let stream = request.accept(&Baggage::default()).expect("accept");
    let (mut reader, mut writer) = tokio::io::split(stream);
    tokio::io::copy(&mut reader, &mut writer)
        .await
        .expect("echo copy");
    writer.shutdown().await.expect("echo shutdown");
}

/// Writes `data` and ends our side while reading the other side to its end.
async fn exchange<S: AsyncRead + AsyncWrite>(stream: S, data: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let send = async {
        writer.write_all(data).await.expect("write");
        writer.shutdown().await.expect("shutdown");
    };
    let receive = async {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = tokio::join!(send, receive);
    got
}

#[derive(Debug, PartialEq)]
struct Seen {
    authority: SocketAddr,
    connection_id: Option<String>,
    forwarded_for: Option<IpAddr>,
    received: Vec<u8>,
}

/// 8 MiB each way over loopback TCP, both directions at once, byte-exact; the request
/// fields (v4 and v6) arrive at the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_round_trip_carries_fields_and_8_mib_each_way() {
    const SIZE: usize = 8 * 1024 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen_tx = seen_tx.clone();
            tokio::spawn(serve(tcp, move |request: InboundRequest| {
                let seen_tx = seen_tx.clone();
                async move {
                    let authority = request.authority();
                    let connection_id = request.connection_id().map(str::to_owned);
                    let forwarded_for = request.forwarded_for();
                    let stream = request.accept(&Baggage::default()).expect("accept");
                    let received = exchange(stream, &pattern(2, SIZE)).await;
                    let _ = seen_tx.send(Seen {
                        authority,
                        connection_id,
                        forwarded_for,
                        received,
                    });
                }
            }));
        }
    });

    let pool = Pool::new(PoolConfig::default());
    let cases = [
        ("10.77.2.10:9000", "10.77.1.10", "conn-v4"),
        ("[fd00::2:10]:443", "fd00::1:10", "conn-v6"),
    ];
    for (authority, from, id) in cases {
        let req = request(authority, from, id);
        let stream = timeout(
            LIMIT,
            pool.connect(key("127.0.0.1"), &req, || TcpStream::connect(addr)),
        )
        .await
        .unwrap()
        .unwrap();
        let got = timeout(LIMIT, exchange(stream, &pattern(1, SIZE)))
            .await
            .unwrap();
        assert!(got == pattern(2, SIZE), "server-to-client bytes differ");
        let seen = timeout(LIMIT, seen_rx.recv()).await.unwrap().unwrap();
        assert_eq!(seen.authority, authority.parse::<SocketAddr>().unwrap());
        assert_eq!(seen.connection_id.as_deref(), Some(id));
        assert_eq!(seen.forwarded_for, Some(from.parse().unwrap()));
        assert!(
            seen.received == pattern(1, SIZE),
            "client-to-server bytes differ"
        );
    }
    assert_eq!(
        pool.connections_for(&key("127.0.0.1")),
        1,
        "second tunnel reused the connection"
    );
}

/// The client ends its side first and still reads the whole reply.
#[tokio::test]
async fn client_half_close_keeps_the_reply_flowing() {
    let peer = Peer::new(|request: InboundRequest| async move {
        let mut stream = request.accept(&Baggage::default()).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        // The reply only starts after the client's END_STREAM arrived.
        let mut reply = b"you said: ".to_vec();
        reply.extend_from_slice(&got);
        reply.extend_from_slice(&pattern(3, 1 << 20));
        stream.write_all(&reply).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let pool = Pool::new(PoolConfig::default());
    let mut stream = pool
        .connect(
            key("10.0.0.2"),
            &request("10.0.0.2:80", "10.0.0.1", "c"),
            peer.dialer(),
        )
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let mut want = b"you said: hello".to_vec();
    want.extend_from_slice(&pattern(3, 1 << 20));
    assert!(reply == want);
    assert!(
        stream.write_all(b"late").await.is_err(),
        "write after shutdown"
    );
}

/// The server ends its side first; the client reads EOF and can still send everything.
#[tokio::test]
async fn server_half_close_keeps_the_request_flowing() {
    let (count_tx, mut count_rx) = mpsc::unbounded_channel();
    let peer = Peer::new(move |request: InboundRequest| {
        let count_tx = count_tx.clone();
        async move {
            let mut stream = request.accept(&Baggage::default()).unwrap();
            stream.write_all(b"banner").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            let _ = count_tx.send(got);
        }
    });
    let pool = Pool::new(PoolConfig::default());
    let mut stream = pool
        .connect(
            key("10.0.0.2"),
            &request("10.0.0.2:80", "10.0.0.1", "c"),
            peer.dialer(),
        )
        .await
        .unwrap();
    let mut banner = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(banner, b"banner");
    let body = pattern(4, 3 << 20);
    stream.write_all(&body).await.unwrap();
    stream.shutdown().await.unwrap();
    let got = timeout(LIMIT, count_rx.recv()).await.unwrap().unwrap();
    assert!(got == body);
}

/// Server-first protocols (SMTP, MySQL): the server's greeting arrives before the client
/// has written anything.
#[tokio::test]
async fn server_speaks_first() {
    let peer = Peer::new(|request: InboundRequest| async move {
        let mut stream = request.accept(&Baggage::default()).unwrap();
        stream.write_all(b"220 ready\r\n").await.unwrap();
        let mut command = [0u8; 6];
        stream.read_exact(&mut command).await.unwrap();
        assert_eq!(&command, b"QUIT\r\n");
        stream.write_all(b"221 bye\r\n").await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let pool = Pool::new(PoolConfig::default());
    let mut stream = pool
        .connect(
            key("10.0.0.2"),
            &request("10.0.0.2:25", "10.0.0.1", "c"),
            peer.dialer(),
        )
        .await
        .unwrap();
    let mut greeting = [0u8; 11];
    timeout(LIMIT, stream.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    stream.write_all(b"QUIT\r\n").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"221 bye\r\n");
}

/// A refusal reaches the client with its status and reason; the connection stays pooled
/// and is reused for the next request.
#[tokio::test]
async fn refusal_reaches_the_client_and_keeps_the_connection() {
    let peer = Peer::new(|request: InboundRequest| async move {
        request.refuse(
            StatusCode::FORBIDDEN,
            "denied by AuthorizationPolicy demo/deny-all",
        );
    });
    let pool = Pool::new(PoolConfig::default());
    for _ in 0..2 {
        let err = pool
            .connect(
                key("10.0.0.2"),
                &request("10.0.0.2:80", "10.0.0.1", "c"),
                peer.dialer(),
            )
            .await
            .unwrap_err();
        match err {
            HboneError::Refused { status, reason } => {
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert_eq!(reason, "denied by AuthorizationPolicy demo/deny-all");
            }
            other => panic!("expected a refusal, got {other}"),
        }
    }
    assert_eq!(peer.dials(), 1);
    assert_eq!(pool.connections_for(&key("10.0.0.2")), 1);
}

/// A handler that drops the request unanswered still answers (500), so the client does
/// not wait forever.
#[tokio::test]
async fn unanswered_request_is_refused_with_500() {
    let peer = Peer::new(|request: InboundRequest| async move { drop(request) });
    let pool = Pool::new(PoolConfig::default());
    let err = timeout(
        LIMIT,
        pool.connect(
            key("10.0.0.2"),
            &request("10.0.0.2:80", "10.0.0.1", "c"),
            peer.dialer(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, HboneError::Refused { status, .. } if status == StatusCode::INTERNAL_SERVER_ERROR),
        "{err}"
    );
}

/// 200 tunnels open at once on one key share ceil(200/100) connections (+1 for a race),
/// dialled without a thundering herd, and all carry their own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_share_pooled_connections() {
    const STREAMS: usize = 200;
    let peer = Peer::new(echo);
    let pool = Pool::new(PoolConfig {
        max_streams_per_connection: 100,
        ..PoolConfig::default()
    });
    let all_open = Arc::new(Barrier::new(STREAMS + 1));
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (pool, peer, all_open) = (pool.clone(), Arc::clone(&peer), Arc::clone(&all_open));
        tasks.push(tokio::spawn(async move {
            let req = request("10.0.0.2:8080", "10.0.0.1", &format!("conn-{i}"));
            let stream = pool
                .connect(key("10.0.0.2"), &req, peer.dialer())
                .await
                .unwrap();
            all_open.wait().await;
            let data = pattern(i as u64 + 100, 32 * 1024);
            let got = exchange(stream, &data).await;
            assert!(got == data, "stream {i} got someone else's bytes");
        }));
    }
    timeout(LIMIT, all_open.wait()).await.unwrap();
    let open = pool.connections_for(&key("10.0.0.2"));
    assert!(
        (2..=3).contains(&open),
        "{open} connections for 200 streams"
    );
    assert!(peer.dials() <= 3, "{} dials", peer.dials());
    for task in tasks {
        timeout(LIMIT, task).await.unwrap().unwrap();
    }
}

/// When the peer goes away, its open streams fail (not a clean EOF), the connection leaves
/// the pool, and the next connect dials again.
#[tokio::test]
async fn broken_connection_is_not_reused() {
    let peer = Peer::new(echo);
    let pool = Pool::new(PoolConfig::default());
    let k = key("10.0.0.2");
    let req = request("10.0.0.2:80", "10.0.0.1", "c");
    let mut open = pool.connect(k.clone(), &req, peer.dialer()).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(pool.connections_for(&k), 1);

    peer.kill();
    let read = timeout(LIMIT, open.read(&mut buf)).await.unwrap();
    assert!(
        read.is_err(),
        "a dead connection must not look like EOF: {read:?}"
    );
    timeout(LIMIT, async {
        while pool.connections_for(&k) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the dead connection stayed in the pool");

    let again = pool.connect(k.clone(), &req, peer.dialer()).await.unwrap();
    assert_eq!(peer.dials(), 2);
    assert_eq!(exchange(again, b"pong").await, b"pong");
}

/// A pooled connection that died before its driver noticed is dropped and the request
/// goes out on a fresh one.
#[tokio::test]
async fn dead_pooled_connection_is_replaced_on_use() {
    let peer = Peer::new(echo);
    let pool = Pool::new(PoolConfig::default());
    let k = key("10.0.0.2");
    let req = request("10.0.0.2:80", "10.0.0.1", "c");
    let first = pool.connect(k.clone(), &req, peer.dialer()).await.unwrap();
    assert_eq!(exchange(first, b"one").await, b"one");
    peer.kill();
    // No waiting: whether the driver or the request notices first, the tunnel works.
    let second = timeout(LIMIT, pool.connect(k.clone(), &req, peer.dialer()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exchange(second, b"two").await, b"two");
    assert_eq!(peer.dials(), 2);
}

/// Idle connections are closed after `idle_timeout`; one with an open stream is not.
#[tokio::test]
async fn idle_connections_are_closed() {
    let idle_timeout = Duration::from_millis(150);
    let peer = Peer::new(echo);
    let pool = Pool::new(PoolConfig {
        idle_timeout,
        ..PoolConfig::default()
    });
    let k = key("10.0.0.2");
    let mut stream = pool
        .connect(
            k.clone(),
            &request("10.0.0.2:80", "10.0.0.1", "c"),
            peer.dialer(),
        )
        .await
        .unwrap();
    tokio::time::sleep(idle_timeout * 3).await;
    assert_eq!(
        pool.connections_for(&k),
        1,
        "closed while a stream was open"
    );
    stream.write_all(b"still here").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still here");
    drop(stream);
    timeout(LIMIT, async {
        while pool.connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("idle connection was not closed");
    // And the server saw a clean close.
    let server = peer.servers.lock().unwrap().pop().unwrap();
    let result = timeout(LIMIT, server).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// A failed dial is reported with the peer's address; a bad connection id never dials.
#[tokio::test]
async fn dial_failures_and_bad_requests_are_explained() {
    let pool = Pool::new(PoolConfig::default());
    let dial = || async { Err::<DuplexStream, _>("connection refused") };
    let err = pool
        .connect(
            key("10.0.0.9"),
            &request("10.0.0.9:80", "10.0.0.1", "c"),
            dial,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Dial { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("10.0.0.9") && message.contains("connection refused"),
        "{message}"
    );
    assert_eq!(pool.connections(), 0);

    let dialled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&dialled);
    let dial = move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<DuplexStream, _>("unreachable") }
    };
    let err = pool
        .connect(
            key("10.0.0.9"),
            &request("10.0.0.9:80", "10.0.0.1", "bad\nid"),
            dial,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::InvalidConnectionId(_)), "{err}");
    assert_eq!(dialled.load(Ordering::SeqCst), 0);
}

/// Requests that are not a plain CONNECT to ip:port get 400 with the reason; the
/// connection carries on.
#[tokio::test]
async fn invalid_requests_get_400() {
    let (client, server) = tokio::io::duplex(PIPE);
    let served = tokio::spawn(serve(server, |request: InboundRequest| async move {
        drop(request.accept(&Baggage::default()));
    }));
    let (sender, connection) = h2::client::handshake(client).await.unwrap();
    tokio::spawn(connection);
    let cases = [
        (Method::GET, "http://10.0.0.2:80/", "not CONNECT"),
        (Method::CONNECT, "backend.demo:80", "ip:port"),
        (Method::CONNECT, "10.0.0.2", "ip:port"),
    ];
    for (method, uri, why) in cases {
        let head = Request::builder().method(method).uri(uri).body(()).unwrap();
        let mut sender = sender.clone().ready().await.unwrap();
        let (response, _send) = sender.send_request(head, true).unwrap();
        let response = timeout(LIMIT, response).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{uri}");
        let reason = response.headers()[REASON_HEADER].to_str().unwrap();
        assert!(reason.contains(why), "{uri}: {reason}");
    }
    drop(sender);
    let result = timeout(LIMIT, served).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// Garbage, TLS records, HTTP/1.1, an early close, or a stalled preface end `serve` with
/// an error, quickly and without a panic.
#[tokio::test]
async fn non_http2_peers_are_rejected() {
    let inputs: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 definitely not http/2 at all",
        b"GET / HTTP/1.1\r\nHost: 10.0.0.2\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        b"",
    ];
    for input in inputs {
        let (mut client, server) = tokio::io::duplex(PIPE);
        let served = tokio::spawn(serve(server, echo));
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let result = timeout(Duration::from_secs(2), served)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(result, Err(HboneError::Handshake(_))),
            "{input:?}: {result:?}"
        );
        drop(client);
    }

    // Half a preface, then silence: bounded by the handshake timeout.
    let (mut client, server) = tokio::io::duplex(PIPE);
    client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let result = timeout(
        Duration::from_secs(2),
        serve_with_handshake_timeout(
            server,
            echo,
            Duration::from_millis(100),
            std::future::pending(),
        ),
    )
    .await
    .unwrap();
    assert!(
        matches!(result, Err(HboneError::HandshakeTimeout(_))),
        "{result:?}"
    );
    drop(client);
}

/// A tunnel is a plain tokio byte stream, and `connect` can be spawned.
#[test]
fn types_fit_the_integrator() {
    fn byte_stream<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static>() {}
    fn send<T: Send>(_: &T) {}
    byte_stream::<HboneStream>();
    let pool = Pool::new(PoolConfig::default());
    let req = request("10.0.0.2:80", "10.0.0.1", "c");
    let connect = pool.connect(key("10.0.0.2"), &req, || async {
        Err::<DuplexStream, _>("not dialled")
    });
    send(&connect);
}

/// A draining server (its pod left the mesh or changed) finishes the stream it carries
/// and takes no new one: the pool dials a new connection for the next stream.
#[tokio::test]
async fn a_draining_server_finishes_its_streams_and_the_pool_dials_anew() {
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let (drain, draining) = tokio::sync::watch::channel(false);
    let dial = |drain_when: Option<tokio::sync::watch::Receiver<bool>>| {
        let dials = Arc::clone(&dials);
        move || {
            dials.fetch_add(1, Ordering::SeqCst);
            let (client, server) = tokio::io::duplex(PIPE);
            tokio::spawn(super::serve_until(server, echo, async move {
                match drain_when {
                    Some(mut rx) => drop(rx.wait_for(|d| *d).await),
                    None => std::future::pending().await,
                }
            }));
            std::future::ready(Ok::<_, io::Error>(client))
        }
    };
    let first = timeout(
        LIMIT,
        pool.connect(
            key("10.0.0.1"),
            &request("10.0.0.1:80", "10.0.0.2", "first"),
            dial(Some(draining)),
        ),
    )
    .await
    .expect("in time")
    .expect("first stream");
    drain.send_replace(true);
    // The GOAWAY crosses the in-memory pipe at once; give the client's driver a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = timeout(
        LIMIT,
        pool.connect(
            key("10.0.0.1"),
            &request("10.0.0.1:80", "10.0.0.2", "second"),
            dial(None),
        ),
    )
    .await
    .expect("in time")
    .expect("second stream");
    assert_eq!(
        dials.load(Ordering::SeqCst),
        2,
        "the second stream needs a new connection"
    );
    let (one, two) = tokio::join!(exchange(first, b"one"), exchange(second, b"two"));
    assert_eq!((one.as_slice(), two.as_slice()), (&b"one"[..], &b"two"[..]));
}

/// The relay as the agents run it — application socket → relay → HBONE stream over
/// HTTP/2 → relay → destination socket — 4 MiB each way at once, byte-exact, with
/// half-close carried through both relays: the destination reads to the client's end,
/// and the client reads the destination's answer to its end.
#[tokio::test]
async fn relay_carries_tcp_through_a_tunnel_both_ways() {
    use crate::proxy::relay::copy_both_ways;
    let upload = pattern(1, 4 << 20);
    let answer = pattern(2, 4 << 20);

    // The destination application.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let app_task = tokio::spawn({
        let answer = answer.clone();
        async move {
            let (stream, _) = app.accept().await.unwrap();
            exchange(stream, &answer).await
        }
    });
    // The destination agent: each accepted stream relayed to the application.
    let peer = Peer::new(move |request: InboundRequest| async move {
        let mut upstream = TcpStream::connect(app_addr).await.unwrap();
        let mut tunnel = request.accept(&Baggage::default()).expect("accept");
        copy_both_ways(&mut tunnel, &mut upstream)
            .await
            .expect("destination relay");
    });
    // The source agent: the client's connection relayed into a pooled stream.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (mut downstream, _) = front.accept().await.unwrap();
    let pool = Pool::new(PoolConfig::default());
    let mut tunnel = timeout(
        LIMIT,
        pool.connect(
            key("10.0.0.2"),
            &request(&app_addr.to_string(), "10.0.0.1", "relay"),
            peer.dialer(),
        ),
    )
    .await
    .expect("in time")
    .expect("stream");
    let relay = tokio::spawn(async move { copy_both_ways(&mut downstream, &mut tunnel).await });

    let got = timeout(LIMIT, exchange(client, &upload))
        .await
        .expect("in time");
    assert!(
        got == answer,
        "the client got {} bytes, not the answer",
        got.len()
    );
    let received = app_task.await.unwrap();
    assert!(
        received == upload,
        "the application got {} bytes",
        received.len()
    );
    let counts = relay.await.unwrap().expect("source relay");
    assert_eq!(counts, (upload.len() as u64, answer.len() as u64));
}

/// A peer opens streams to an application that writes without end, takes the answers,
/// then never reads again while its windows say "send all you like": what the agent takes
/// from the application — and so holds — stays within h2's send buffer per stream
/// ([`super::tuning::MAX_SEND_BUFFER`]); the relay stops reading from the application
/// when the stream has no room, instead of holding a chunk it cannot send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_pins_at_most_the_send_buffer_per_stream() {
    use crate::proxy::relay::copy_both_ways;
    use std::{os::fd::AsRawFd as _, pin::pin};
    const STREAMS: usize = 32;

    // The application: once told to go, writes on every connection until the write
    // fails. `written` counts what it wrote; `sockets` the kernel's queues on both sides,
    // so that what the agent read is exactly `written` minus what the queues still hold.
    let (go, wait_for_go) = tokio::sync::watch::channel(false);
    let written = Arc::new(AtomicUsize::new(0));
    let sockets = Arc::new(Mutex::new(Vec::new()));
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn({
        let (written, sockets) = (Arc::clone(&written), Arc::clone(&sockets));
        async move {
            loop {
                let (mut stream, _) = app.accept().await.unwrap();
                sockets
                    .lock()
                    .unwrap()
                    .push((libc::TIOCOUTQ, stream.as_raw_fd()));
                let written = Arc::clone(&written);
                let mut wait_for_go = wait_for_go.clone();
                tokio::spawn(async move {
                    wait_for_go.wait_for(|go| *go).await.unwrap();
                    let block = pattern(3, 16 * 1024);
                    while let Ok(n) = stream.write(&block).await {
                        written.fetch_add(n, Ordering::SeqCst);
                    }
                    std::future::pending::<()>().await;
                });
            }
        }
    });
    let (client, server) = tokio::io::duplex(PIPE);
    tokio::spawn(serve(server, {
        let sockets = Arc::clone(&sockets);
        move |request: InboundRequest| {
            let sockets = Arc::clone(&sockets);
            async move {
                let mut upstream = TcpStream::connect(app_addr).await.unwrap();
                sockets
                    .lock()
                    .unwrap()
                    .push((libc::FIONREAD, upstream.as_raw_fd()));
                let mut tunnel = request.accept(&Baggage::default()).expect("accept");
                let _ = copy_both_ways(&mut tunnel, &mut upstream).await;
                std::future::pending::<()>().await;
            }
        }
    }));
    let read_by_agent = || {
        let queued: usize = sockets
            .lock()
            .unwrap()
            .iter()
            .map(|&(request, fd)| {
                let mut queued: libc::c_int = 0;
                // SAFETY: both ioctls write one int; the fds live until the test ends.
                assert_eq!(unsafe { libc::ioctl(fd, request, &mut queued) }, 0);
                queued as usize
            })
            .sum();
        written.load(Ordering::SeqCst) - queued
    };

    // The peer: windows as large as HTTP/2 allows.
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, bytes::Bytes>(client)
        .await
        .unwrap();
    let mut connection = pin!(connection);
    let mut open = Vec::new();
    for i in 0..STREAMS {
        let head = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("10.0.0.2:{}", 1000 + i))
            .body(())
            .unwrap();
        let mut sender = tokio::select! {
            ready = sender.clone().ready() => ready.unwrap(),
            _ = &mut connection => panic!("the connection ended"),
        };
        let (response, send) = sender.send_request(head, false).unwrap();
        let response = tokio::select! {
            response = response => response.unwrap(),
            _ = &mut connection => panic!("the connection ended"),
        };
        assert_eq!(response.status(), StatusCode::OK);
        open.push((response, send));
    }
    // From here on nobody polls `connection`: the peer reads nothing more. Now the
    // application writes; wait until the agent stops taking bytes.
    go.send_replace(true);
    let mut last = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = read_by_agent();
        if now == last {
            break;
        }
        last = now;
    }
    // What crossed into the pipe before it filled is not the agent's.
    let per_stream = last.saturating_sub(PIPE) / STREAMS;
    // The frame headers in the pipe take a few bytes of it.
    assert!(
        per_stream <= super::tuning::MAX_SEND_BUFFER + 1024,
        "the agent took {per_stream} bytes per stream from the application (bound: {})",
        super::tuning::MAX_SEND_BUFFER
    );
    drop(open);
}
