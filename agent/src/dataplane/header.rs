//! The stream header: the first bytes of every forwarded stream, and the one-byte answer.
//!
//! Wire: `u16 length (big-endian) | bincode(StreamHeader)`, at most [`MAX_HEADER`] bytes, then
//! the receiver answers one [`Answer`] byte. Only after `Answer::Accepted` do app bytes flow, so a
//! sender whose stream was refused has sent nothing and may retry on another instance.

use std::net::SocketAddr;

use bincode::{Decode, Encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this agent speaks.
pub const VERSION: u8 = 1;
/// The largest header a receiver reads.
pub const MAX_HEADER: usize = 4096;

/// What a forwarded stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct StreamHeader {
    pub version: u8,
    pub service: String,
    /// The node id the sender chose; the receiver refuses a stream meant for another node.
    pub target: String,
    pub affinity_key: Option<String>,
    /// The original client's address, for logs and X-Forwarded-For.
    pub client_addr: Option<SocketAddr>,
}

/// The receiver's answer, one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Accepted = 0,
    /// This agent fronts no such service.
    UnknownService = 1,
    Unhealthy = 2,
    Draining = 3,
    /// The local app refused the connection.
    ConnectFailed = 4,
    BadHeader = 5,
    WrongTarget = 6,
    UnsupportedVersion = 7,
}

impl Answer {
    pub fn from_byte(b: u8) -> Option<Answer> {
        use Answer::*;
        [Accepted, UnknownService, Unhealthy, Draining, ConnectFailed, BadHeader, WrongTarget, UnsupportedVersion]
            .into_iter()
            .find(|a| *a as u8 == b)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Accepted => "accepted",
            Answer::UnknownService => "unknown_service",
            Answer::Unhealthy => "unhealthy",
            Answer::Draining => "draining",
            Answer::ConnectFailed => "connect_failed",
            Answer::BadHeader => "bad_header",
            Answer::WrongTarget => "wrong_target",
            Answer::UnsupportedVersion => "unsupported_version",
        }
    }
}

fn config() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_HEADER>,
> {
    bincode::config::standard().with_big_endian().with_limit::<MAX_HEADER>()
}

/// Writes a header.
pub async fn write_header(w: &mut (impl AsyncWrite + Unpin), h: &StreamHeader) -> std::io::Result<()> {
    let body = encode(h);
    if body.is_empty() || body.len() > MAX_HEADER {
        return Err(std::io::Error::other("stream header too large"));
    }
    let mut frame = Vec::with_capacity(2 + body.len());
    frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await
}

/// Reads a header; `Err(answer)` says why it was refused.
pub async fn read_header(r: &mut (impl AsyncRead + Unpin)) -> Result<StreamHeader, Answer> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.map_err(|_| Answer::BadHeader)?;
    let len = u16::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_HEADER {
        return Err(Answer::BadHeader);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|_| Answer::BadHeader)?;
    decode(&body)
}

/// Decodes a header's body (the bytes after its length); every byte must belong to it.
pub fn decode(body: &[u8]) -> Result<StreamHeader, Answer> {
    let (h, used): (StreamHeader, usize) = bincode::decode_from_slice(body, config()).map_err(|_| Answer::BadHeader)?;
    if used != body.len() {
        return Err(Answer::BadHeader);
    }
    if h.version != VERSION {
        return Err(Answer::UnsupportedVersion);
    }
    Ok(h)
}

/// A header's body as [`decode`] reads it.
pub fn encode(h: &StreamHeader) -> Vec<u8> {
    bincode::encode_to_vec(h, config()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_refuses_garbage() {
        let h = StreamHeader {
            version: VERSION,
            service: "profile".into(),
            target: "web-2".into(),
            affinity_key: Some("token".into()),
            client_addr: Some("10.0.0.7:5555".parse().unwrap()),
        };
        let mut buf = Vec::new();
        write_header(&mut buf, &h).await.unwrap();
        assert_eq!(read_header(&mut buf.as_slice()).await.unwrap(), h);
        for garbage in [&b""[..], &[0, 0], &[0xff, 0xff, 1, 2], &[0, 3, 0xff, 0xff, 0xff], &[0, 1]] {
            assert_eq!(read_header(&mut &garbage[..]).await, Err(Answer::BadHeader), "{garbage:?}");
        }
        let mut old = h.clone();
        old.version = 9;
        let mut buf = Vec::new();
        write_header(&mut buf, &old).await.unwrap();
        assert_eq!(read_header(&mut buf.as_slice()).await, Err(Answer::UnsupportedVersion));
        for b in 0..=8u8 {
            assert_eq!(Answer::from_byte(b).map(|a| a as u8), (b <= 7).then_some(b));
        }
    }
}
