//! In-process connections. Services that share a process (`sagamesh up`)
//! call each other through an in-memory pipe instead of the loopback
//! network: the same gRPC server and clients, without the two system calls
//! and the kernel's TCP path that every message over a socket costs.

use std::io;

use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Bytes each direction of a pipe buffers before the writer waits.
const PIPE_BUFFER: usize = 256 * 1024;
/// Connections opened but not yet accepted by the server.
const ACCEPT_QUEUE: usize = 16;

/// A channel to this process's own server, and the connections it opens,
/// for the server to accept.
pub(crate) fn connect() -> (
    Channel,
    impl Stream<Item = io::Result<DuplexStream>> + Send + 'static,
) {
    let (accept, accepted) = mpsc::channel::<DuplexStream>(ACCEPT_QUEUE);
    let connector = tower::service_fn(move |_: Uri| {
        let accept = accept.clone();
        async move {
            let (client, server) = tokio::io::duplex(PIPE_BUFFER);
            accept.send(server).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the server of this process has stopped",
                )
            })?;
            Ok::<_, io::Error>(TokioIo::new(client))
        }
    });
    let channel = Endpoint::from_static("http://in-process").connect_with_connector_lazy(connector);
    (channel, ReceiverStream::new(accepted).map(Ok))
}
