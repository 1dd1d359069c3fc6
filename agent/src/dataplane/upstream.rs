//! Upstream listeners (L4): the local app connects to `127.0.0.1:9001` and reaches an instance
//! of the service; bytes are spliced both ways with half-close, so any TCP protocol works.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::{BackendStream, DataPlane, splice};

/// Serves one upstream listener until the task is aborted.
pub async fn serve(listener: TcpListener, service: String, dp: Arc<DataPlane>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "upstream accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let (dp, service) = (dp.clone(), service.clone());
        // The connecting task holds the routing and retry state; the forwarded connection then
        // gets a task of its own holding only the splice, so an idle one costs no more.
        tokio::spawn(async move {
            match Box::pin(dp.connect(&service, None, Some(peer))).await {
                Ok(fwd) => match fwd.stream {
                    BackendStream::Quic(q) => {
                        let (recv, send) = q.into_inner();
                        tokio::spawn(splice::tcp_quic(client, send, recv).idle_limit(dp.idle.as_ref()));
                    }
                    BackendStream::Tcp(app, active) => {
                        let splice = splice::Splice::new(client, app).idle_limit(dp.idle.as_ref());
                        tokio::spawn(splice::Holding::new(splice, active));
                    }
                },
                Err(e) => {
                    // Closing without a byte tells the app the connection failed.
                    tracing::warn!(service = %service, error = %e, "upstream connection not forwarded");
                }
            }
        });
    }
}
