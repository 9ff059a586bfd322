//! warren's kernel programs. They stay tiny on purpose — redirect and record, nothing
//! else; every decision about identity and policy is made by the agent in user space
//! (verifier trouble grows with program size: Kmesh's issue tracker is the warning).
//!
//! - `connect4`/`connect6` (cgroup sock_addr, attached once at the cgroup v2 root): a TCP
//!   `connect()` from an enrolled pod's netns to an address that is neither loopback nor
//!   the pod's own is rewritten to the agent's outbound listener on loopback; the original
//!   destination is recorded by socket cookie.
//! - `sock_ops` (same cgroup): when that redirected connection is established, re-key the
//!   original destination by (netns cookie, client address) — what the agent sees on
//!   `accept()`.
//! - `sk_lookup` (one link per enrolled pod netns): TCP for the pod's addresses, any port but
//!   the tunnel port, is delivered to the agent's inbound listener; the accepted socket keeps
//!   the local address the client dialled. TCP to any other address of the pod (IPv6
//!   link-local, an address added later) is refused.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use warren_common::{
    ClientKey, EnrolledNetns, IpKey, OwnIpKey, PendingOriginalDst, SockAddr, AF_INET, AF_INET6,
    AGENT_SOCKET_MARK, INBOUND_TUNNEL_PORT, IPPROTO_TCP, OUTBOUND_PORT,
};

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// Verdicts of sk_lookup programs.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[map]
static ENROLLED_NETNS: HashMap<u64, EnrolledNetns> = HashMap::pinned(16384, 0);

#[map]
static PENDING_ORIGINAL_DST: LruHashMap<u64, PendingOriginalDst> = LruHashMap::pinned(65536, 0);

#[map]
static ORIGINAL_DST: LruHashMap<ClientKey, SockAddr> = LruHashMap::pinned(65536, 0);

#[map]
static INBOUND_POD_IPS: HashMap<IpKey, u32> = HashMap::pinned(16384, 0);

#[map]
static INBOUND_LISTENERS: SockHash<IpKey> = SockHash::pinned(16384, 0);

#[map]
static POD_OWN_IPS: HashMap<OwnIpKey, u32> = HashMap::pinned(16384, 0);

#[cgroup_sock_addr(connect4)]
pub fn warren_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr; for connect4 user_ip4 and user_port
    // are readable and writable.
    unsafe {
        let sa = ctx.sock_addr;
        let dst = SockAddr {
            ip: IpKey::from_v4_raw((*sa).user_ip4),
            port: u16::from_be((*sa).user_port as u16),
            _pad: 0,
        };
        if !should_redirect(&ctx, sa, &dst) {
            return ALLOW;
        }
        if !record_original_dst(&ctx, dst) {
            return REJECT;
        }
        (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn warren_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4; user_ip6 is accessed one 32-bit word at a time, the only
    // width the verifier accepts for it.
    unsafe {
        let sa = ctx.sock_addr;
        let words = read_ip6(&(*sa).user_ip6);
        let dst = SockAddr {
            ip: IpKey { words },
            port: u16::from_be((*sa).user_port as u16),
            _pad: 0,
        };
        if !should_redirect(&ctx, sa, &dst) {
            return ALLOW;
        }
        if !record_original_dst(&ctx, dst) {
            return REJECT;
        }
        // An IPv4-mapped destination on an AF_INET6 socket stays IPv4-mapped.
        let target = if dst.ip.is_v4_mapped() {
            IpKey::from_v4_raw(u32::from_ne_bytes([127, 0, 0, 1])).words
        } else {
            [0, 0, 0, u32::from_be(1)]
        };
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], target[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], target[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], target[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], target[3]);
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    ALLOW
}

/// A TCP connect from an enrolled pod, not by the agent, not to loopback, not to one of
/// the pod's own addresses (that never leaves the pod; iptables mode skips it on `lo`).
///
/// # Safety
/// `sa` must be the context's `bpf_sock_addr`.
#[inline(always)]
unsafe fn should_redirect(ctx: &SockAddrContext, sa: *mut bpf_sock_addr, dst: &SockAddr) -> bool {
    unsafe {
        if (*sa).protocol != IPPROTO_TCP || dst.port == 0 || dst.ip.is_loopback() {
            return false;
        }
        let netns_cookie = bpf_get_netns_cookie(ctx.sock_addr.cast());
        if ENROLLED_NETNS.get(&netns_cookie).is_none() {
            return false;
        }
        let own = OwnIpKey {
            netns_cookie,
            ip: dst.ip,
        };
        if POD_OWN_IPS.get(&own).is_some() {
            return false;
        }
        let sk = (*sa).__bindgen_anon_1.sk;
        !sk.is_null() && (*sk).mark != AGENT_SOCKET_MARK
    }
}

/// Remember where the socket wanted to go. Without a record the agent could not forward
/// the connection, so the caller refuses the connect instead (fail closed).
#[inline(always)]
fn record_original_dst(ctx: &SockAddrContext, original_dst: SockAddr) -> bool {
    // SAFETY: both helpers accept a sock_addr context.
    let (socket_cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock_addr.cast()),
            bpf_get_netns_cookie(ctx.sock_addr.cast()),
        )
    };
    let pending = PendingOriginalDst {
        netns_cookie,
        original_dst,
        _pad: 0,
    };
    match PENDING_ORIGINAL_DST.insert(&socket_cookie, &pending, 0) {
        Ok(()) => true,
        Err(err) => {
            warn!(
                ctx,
                "warren: cannot record original destination (error {}); refusing connect", err
            );
            false
        }
    }
}

#[sock_ops]
pub fn warren_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: sock_ops contexts are accepted by bpf_get_socket_cookie.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out at once; a concurrent delete can only make it stale.
    let Some(pending) = (unsafe { PENDING_ORIGINAL_DST.get(&socket_cookie) }).copied() else {
        return 1;
    };
    // Both address fields are read unconditionally and the family picks one afterwards:
    // with a load per branch, LLVM merges them into one load at a computed context
    // offset, which the verifier rejects ("dereference of modified ctx ptr").
    // SAFETY: plain reads of the kernel-provided bpf_sock_ops; local_ip6 of an IPv4 socket
    // reads as zeroes.
    let (family, ip4, ip6, port) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            read_ip6(&(*ops).local_ip6),
            // local_port is in host byte order in bpf_sock_ops.
            core::ptr::read_volatile(&(*ops).local_port) as u16,
        )
    };
    let ip = match family {
        AF_INET => IpKey::from_v4_raw(ip4),
        AF_INET6 => IpKey { words: ip6 },
        _ => return 1,
    };
    let key = ClientKey {
        netns_cookie: pending.netns_cookie,
        client: SockAddr { ip, port, _pad: 0 },
        _pad: 0,
    };
    if let Err(err) = ORIGINAL_DST.insert(&key, &pending.original_dst, 0) {
        warn!(
            &ctx,
            "warren: cannot store original destination (error {})", err
        );
    }
    let _ = PENDING_ORIGINAL_DST.remove(&socket_cookie);
    1
}

#[sk_lookup]
pub fn warren_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sk_lookup; all fields read here are readable.
    // As in sock_ops: read both families' fields, then choose (see there).
    // SAFETY: plain reads of the kernel-provided bpf_sk_lookup; the IPv6 fields of an IPv4
    // lookup read as zeroes.
    let (protocol, family, local_port, local4, remote4, local6, remote6) = unsafe {
        let l = ctx.lookup;
        (
            core::ptr::read_volatile(&(*l).protocol),
            core::ptr::read_volatile(&(*l).family),
            core::ptr::read_volatile(&(*l).local_port),
            core::ptr::read_volatile(&(*l).local_ip4),
            core::ptr::read_volatile(&(*l).remote_ip4),
            read_ip6(&(*l).local_ip6),
            read_ip6(&(*l).remote_ip6),
        )
    };
    if protocol != IPPROTO_TCP || local_port == u32::from(INBOUND_TUNNEL_PORT) {
        return SK_PASS;
    }
    let (local, remote) = match family {
        AF_INET => (IpKey::from_v4_raw(local4), IpKey::from_v4_raw(remote4)),
        AF_INET6 => (IpKey { words: local6 }, IpKey { words: remote6 }),
        _ => return SK_PASS,
    };
    // The pod (or the agent inside it) talking to itself: normal delivery.
    if local == remote || local.is_loopback() {
        return SK_PASS;
    }
    // This program is attached only to enrolled pods' netns, so every other lookup is
    // traffic to the pod. An address the agent does not serve (IPv6 link-local, one
    // added to the pod after it was captured) is refused, never delivered to the app
    // behind the agent's back: fail closed.
    // SAFETY: presence check only.
    if unsafe { INBOUND_POD_IPS.get(&local) }.is_none() {
        return SK_DROP;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => SK_PASS,
        // The pod is captured but the agent's listener is gone (agent restarting): refuse
        // (the kernel answers with a reset) rather than deliver plaintext to the app behind
        // the agent's back — fail closed, like the outbound side.
        Err(_) => SK_DROP,
    }
}

/// One 32-bit load per word: the only width the verifier accepts for these fields.
#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reading from a valid reference.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
