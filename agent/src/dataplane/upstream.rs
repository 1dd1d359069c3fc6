//! Upstream listeners (L4): the local app connects to `127.0.0.1:9001` and reaches an instance
//! of the service; bytes are spliced both ways with half-close, so any TCP protocol works.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::{BackendStream, DataPlane, splice, splice_quic};

/// Serves one upstream listener until the task is aborted.
pub async fn serve(listener: TcpListener, service: String, dp: Arc<DataPlane>) {
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "upstream accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let (dp, service) = (dp.clone(), service.clone());
        tokio::spawn(async move {
            // Boxed: the routing and retry state is large and only needed until the connection
            // is made; kept inline, every idle forwarded connection would hold it.
            match Box::pin(dp.connect(&service, None, Some(peer))).await {
                Ok(fwd) => match fwd.stream {
                    BackendStream::Quic(q) => {
                        let (recv, send) = q.into_inner();
                        splice_quic(client, send, recv).await;
                    }
                    BackendStream::Tcp(mut app) => {
                        let _ = splice(&mut client, &mut app).await;
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
