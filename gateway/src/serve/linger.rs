//! A lingering close. A request answered before its body was read (413, 503, a bad
//! path) ends the connection (HTTP/1.1: `Connection: close`) while the client may
//! still be sending that body. Closing the socket then with unread bytes makes the
//! kernel send a reset, which can reach the client before it reads the answer: it
//! sees "broken pipe" instead of the 413. So when the connection ends, its write side
//! is shut (TLS close_notify, then FIN) and what the client still sends is read and
//! dropped, for at most `LINGER_TIME` and `LINGER_BYTES`, before the socket closes.
//! The connection keeps its place in `max_connections` meanwhile.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Longest a closed connection is drained.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Most bytes read and dropped from a closed connection.
pub const LINGER_BYTES: u64 = 16 << 20;

pub struct Linger<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// Always `Some` until dropped.
    inner: Option<T>,
    /// Held until the drain ends (the connection's place).
    hold: Option<Box<dyn Send>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> std::fmt::Debug for Linger<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linger").finish_non_exhaustive()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Linger<T> {
    pub fn new(inner: T, hold: Box<dyn Send>) -> Linger<T> {
        Linger {
            inner: Some(inner),
            hold: Some(hold),
        }
    }

    fn io(&mut self) -> io::Result<&mut T> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection closed"))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Linger<T> {
    fn drop(&mut self) {
        let (Some(mut io), hold) = (self.inner.take(), self.hold.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _hold = hold;
            let drain = async {
                let _ = io.shutdown().await;
                let mut buf = vec![0u8; 16 * 1024];
                let mut total = 0u64;
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    total += n as u64;
                    if total > LINGER_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, drain).await;
        });
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Linger<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Linger<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
