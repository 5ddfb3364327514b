//! Reading a TLS ClientHello without terminating TLS: enough of the
//! client's first bytes to learn the server name it asks for (SNI), kept
//! whole so they can be passed on to the backend unchanged. The wire
//! format is the `tls-parser` crate's; this module decides how much to
//! read, for how long, and what counts as refused.

use std::time::Duration;
use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
    parse_tls_client_hello_extensions, parse_tls_message_handshake, parse_tls_raw_record,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The most of a client's first bytes read for its ClientHello: a real
/// one (with post-quantum key shares) is under 2 KiB; this is one full
/// TLS record.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

/// Handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;

/// What was read: every byte taken off the socket, and the name asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// To be written to the backend before anything else of the client's.
    pub bytes: Vec<u8>,
    /// The host name of the SNI extension, as sent; `None` without one.
    pub server_name: Option<String>,
}

/// Why a connection's ClientHello was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The first bytes are not a TLS handshake record.
    NotTls,
    /// A TLS handshake, but not a ClientHello that parses.
    Malformed,
    /// Longer than `MAX_CLIENT_HELLO`.
    Oversized,
    /// Not all there within the timeout.
    Timeout,
    /// The client closed (or reset) before it was all there.
    Closed,
}

impl Refused {
    pub const ALL: [Refused; 5] = [
        Refused::NotTls,
        Refused::Malformed,
        Refused::Oversized,
        Refused::Timeout,
        Refused::Closed,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refused::NotTls => "not_tls",
            Refused::Malformed => "malformed",
            Refused::Oversized => "oversized",
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
        }
    }
}

/// Where parsing the bytes so far got to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    Incomplete,
    /// The whole ClientHello is there; its server name, if any.
    Complete(Option<String>),
}

/// Parses the first bytes of a connection. The ClientHello may span
/// several handshake records; a partial record or message is
/// `Incomplete`, never an error, however the bytes were split.
pub fn parse(buf: &[u8]) -> Result<Progress, Refused> {
    match buf {
        [] => return Ok(Progress::Incomplete),
        [t, ..] if *t != u8::from(TlsRecordType::Handshake) => return Err(Refused::NotTls),
        [_, major, ..] if *major != 3 => return Err(Refused::NotTls),
        _ => {}
    }
    let mut rest = buf;
    let mut message = Vec::new();
    loop {
        let (after, record) = match parse_tls_raw_record(rest) {
            Ok(r) => r,
            Err(tls_parser::Err::Incomplete(_)) => break,
            // A record longer than TLS allows.
            Err(_) => return Err(Refused::Malformed),
        };
        if record.hdr.record_type != TlsRecordType::Handshake {
            return Err(Refused::Malformed);
        }
        message.extend_from_slice(record.data);
        rest = after;
        if let Some(p) = client_hello(&message)? {
            return Ok(p);
        }
    }
    // The record under way may already say how long the message is.
    if rest.len() > 5 && rest[0] == u8::from(TlsRecordType::Handshake) {
        message.extend_from_slice(&rest[5..]);
        declared_len(&message)?;
    }
    if buf.len() >= MAX_CLIENT_HELLO {
        return Err(Refused::Oversized);
    }
    Ok(Progress::Incomplete)
}

/// The length a handshake message's header gives, once it is there; a
/// message that is not a ClientHello, or too long to take, is refused.
fn declared_len(message: &[u8]) -> Result<Option<usize>, Refused> {
    let [kind, a, b, c, ..] = *message else {
        return Ok(None);
    };
    if kind != CLIENT_HELLO {
        return Err(Refused::Malformed);
    }
    let len = u32::from_be_bytes([0, a, b, c]) as usize;
    if len + 4 > MAX_CLIENT_HELLO {
        return Err(Refused::Oversized);
    }
    Ok(Some(len))
}

/// The server name of a handshake message once it is whole; `None` while
/// it is not.
fn client_hello(message: &[u8]) -> Result<Option<Progress>, Refused> {
    let Some(len) = declared_len(message)? else {
        return Ok(None);
    };
    if message.len() < len + 4 {
        return Ok(None);
    }
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(&message[..len + 4])
    else {
        return Err(Refused::Malformed);
    };
    let Some(ext) = hello.ext else {
        return Ok(Some(Progress::Complete(None)));
    };
    let Ok((_, extensions)) = parse_tls_client_hello_extensions(ext) else {
        return Err(Refused::Malformed);
    };
    let name = extensions.iter().find_map(|e| match e {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(t, _)| *t == SNIType::HostName)
            .map(|(_, n)| n),
        _ => None,
    });
    match name {
        None => Ok(Some(Progress::Complete(None))),
        Some(n) => match std::str::from_utf8(n) {
            Ok(n) if !n.is_empty() => Ok(Some(Progress::Complete(Some(n.to_owned())))),
            _ => Err(Refused::Malformed),
        },
    }
}

/// Reads the client's ClientHello off `stream` (consuming it: the bytes
/// come back in the result), within `timeout` for the whole of it.
pub async fn read_client_hello(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<ClientHello, Refused> {
    let mut taken = Vec::with_capacity(2048);
    let bytes = &mut taken;
    let read = async move {
        loop {
            if let Progress::Complete(server_name) = parse(bytes)? {
                return Ok(server_name);
            }
            let room = MAX_CLIENT_HELLO - bytes.len();
            match (&mut *stream).take(room as u64).read_buf(bytes).await {
                Ok(0) | Err(_) => return Err(Refused::Closed),
                Ok(_) => {}
            }
        }
    };
    let result = tokio::time::timeout(timeout, read).await;
    match result {
        Ok(Ok(server_name)) => Ok(ClientHello {
            bytes: taken,
            server_name,
        }),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(Refused::Timeout),
    }
}
