//! The client's payload: deterministic pseudo-random bytes, so the receiving side
//! can regenerate and compare them without storing a copy, and so that a proxy that
//! corrupts, reorders or drops bytes cannot go unnoticed (unlike with zeros).

/// An endless deterministic byte stream (splitmix64), or a marker text repeated (to look
/// for on the wire). The bytes do not depend on how the stream is cut into chunks.
#[derive(Clone, Debug)]
pub struct Payload {
    state: u64,
    word: [u8; 8],
    used: usize,
    marker: Option<(Vec<u8>, usize)>,
}

/// The seed of the default stream: "warren!!".
const SEED: u64 = 0x7761_7272_656e_2121;

impl Default for Payload {
    fn default() -> Self {
        Payload::new(SEED)
    }
}

impl Payload {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Payload {
        Payload {
            state: seed,
            word: [0; 8],
            used: 8,
            marker: None,
        }
    }

    /// `marker` repeated without end (the pseudo-random stream when it is empty or absent).
    pub fn marker(marker: Option<&str>) -> Payload {
        Payload {
            marker: marker
                .filter(|m| !m.is_empty())
                .map(|m| (m.as_bytes().to_vec(), 0)),
            ..Payload::default()
        }
    }

    /// What connection `index` of a `--parallel` run sends: `marker` repeated, or a
    /// pseudo-random stream of its own, so that a proxy that crossed two streams'
    /// bytes is caught. Connection 0 sends the default stream, as a lone client does.
    pub fn for_connection(marker: Option<&str>, index: usize) -> Payload {
        Payload {
            state: SEED.wrapping_add(index as u64),
            ..Payload::marker(marker)
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fill `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        if let Some((marker, at)) = &mut self.marker {
            for byte in out {
                *byte = marker[*at];
                *at = (*at + 1) % marker.len();
            }
            return;
        }
        for byte in out {
            if self.used == 8 {
                self.word = self.next_word();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }

    /// Compare `data` with the next bytes of the stream; returns the index of the
    /// first difference.
    pub fn check(&mut self, data: &[u8]) -> Option<usize> {
        let mut expected = vec![0u8; data.len()];
        self.fill(&mut expected);
        data.iter().zip(&expected).position(|(a, b)| a != b)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn marker_repeats_across_chunks() {
        let mut payload = super::Payload::marker(Some("abc"));
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        payload.fill(&mut a);
        payload.fill(&mut b);
        assert_eq!(&a, b"abca");
        assert_eq!(&b, b"bcab");
    }

    use super::*;

    #[test]
    fn independent_of_chunking() {
        let mut whole = vec![0u8; 1000];
        Payload::default().fill(&mut whole);
        let mut pieces = Payload::default();
        let mut joined = Vec::new();
        for size in [1, 7, 8, 9, 100, 875] {
            let mut chunk = vec![0u8; size];
            pieces.fill(&mut chunk);
            joined.extend(chunk);
        }
        assert_eq!(whole, joined);
        assert!(whole.iter().any(|b| *b != whole[0]), "not constant");
    }

    #[test]
    fn connections_get_streams_of_their_own() {
        let mut first = [0u8; 64];
        let mut second = [0u8; 64];
        Payload::for_connection(None, 0).fill(&mut first);
        Payload::for_connection(None, 1).fill(&mut second);
        let mut lone = [0u8; 64];
        Payload::default().fill(&mut lone);
        assert_eq!(first, lone);
        assert_ne!(first, second);
        // Not the same stream shifted by a word either.
        assert_ne!(first[8..], second[..56]);
        assert_ne!(first[..56], second[8..]);
        let mut marked = [0u8; 4];
        Payload::for_connection(Some("ab"), 7).fill(&mut marked);
        assert_eq!(&marked, b"abab");
    }

    #[test]
    fn check_finds_the_first_difference() {
        let mut data = vec![0u8; 64];
        Payload::default().fill(&mut data);
        assert_eq!(Payload::default().check(&data), None);
        data[40] ^= 1;
        let mut p = Payload::default();
        assert_eq!(p.check(&data[..32]), None);
        assert_eq!(p.check(&data[32..]), Some(8));
    }
}
