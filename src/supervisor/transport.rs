//! HTTP/1.1 `POST /RPC2` to supervisord over a unix socket or TCP, with basic auth and a timeout.
//! hyper does the HTTP (its low-level `client::conn` over a tokio stream, one connection a call);
//! the crate already comes with the AWS SDK, so unix sockets cost no new HTTP stack.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::SupervisorError;
use crate::secret::Secret;

/// Where supervisord listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path/to/sock` or `http://host:port` (as in `SUPERVISOR_SERVER_URL`).
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(format!("supervisor URL {url:?} names no socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("http://") {
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.is_empty() {
                return Err(format!("supervisor URL {url:?} names no host"));
            }
            let authority = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
            return Ok(Endpoint::Tcp(authority));
        }
        Err(format!("supervisor URL {url:?}: expected unix:///path/to/supervisor.sock or http://host:port"))
    }
}

/// One configured connection target.
#[derive(Debug, Clone)]
pub struct Transport {
    pub url: String,
    endpoint: Endpoint,
    authorization: Option<Secret>,
    timeout: Duration,
}

impl Transport {
    pub fn new(
        url: &str,
        username: Option<&str>,
        password: Option<&Secret>,
        timeout: Duration,
    ) -> Result<Self, SupervisorError> {
        let endpoint = Endpoint::parse(url).map_err(|why| SupervisorError::BadUrl { why })?;
        let authorization = match (username, password) {
            (None, None) => None,
            (u, p) => {
                let raw = format!("{}:{}", u.unwrap_or_default(), p.map(Secret::expose).unwrap_or_default());
                Some(Secret::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))))
            }
        };
        Ok(Self { url: url.to_owned(), endpoint, authorization, timeout })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Posts an XML-RPC body and returns the response body; `method` names the call in errors.
    pub async fn post(&self, method: &str, body: String, timeout: Duration) -> Result<Bytes, SupervisorError> {
        match tokio::time::timeout(timeout, self.post_inner(body)).await {
            Ok(r) => r,
            Err(_) => {
                Err(SupervisorError::Timeout { url: self.url.clone(), method: method.to_owned(), after: timeout })
            }
        }
    }

    async fn post_inner(&self, body: String) -> Result<Bytes, SupervisorError> {
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_owned(),
            Endpoint::Tcp(a) => a.clone(),
        };
        let mut req = hyper::Request::post("/RPC2")
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "text/xml")
            .header(hyper::header::USER_AGENT, concat!("elb-quorum/", env!("CARGO_PKG_VERSION")));
        if let Some(auth) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, auth.expose());
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("static request parts are valid");
        let response = match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| self.connect_error(e))?;
                send(TokioIo::new(stream), req).await
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| self.connect_error(e))?;
                send(TokioIo::new(stream), req).await
            }
        }
        .map_err(|e| SupervisorError::Http { url: self.url.clone(), detail: e.to_string() })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| SupervisorError::Http { url: self.url.clone(), detail: e.to_string() })?
            .to_bytes();
        if status == hyper::StatusCode::UNAUTHORIZED {
            return Err(SupervisorError::Unauthorized { url: self.url.clone() });
        }
        if !status.is_success() {
            return Err(SupervisorError::Http {
                url: self.url.clone(),
                detail: format!("HTTP {status}: {}", crate::protocol::quote(&bytes, 120)),
            });
        }
        Ok(bytes)
    }

    fn connect_error(&self, e: std::io::Error) -> SupervisorError {
        let target = match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp(a) => a.clone(),
        };
        match e.kind() {
            std::io::ErrorKind::NotFound => SupervisorError::SocketMissing { path: target },
            std::io::ErrorKind::PermissionDenied => SupervisorError::PermissionDenied { path: target },
            _ => SupervisorError::Connect { url: self.url.clone(), source: e },
        }
    }
}

async fn send<T>(
    io: TokioIo<T>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let response = sender.send_request(req).await;
    if response.is_err() {
        driver.abort();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::parse("unix:///tmp/s.sock").unwrap(), Endpoint::Unix("/tmp/s.sock".into()));
        assert_eq!(Endpoint::parse("http://127.0.0.1:9001").unwrap(), Endpoint::Tcp("127.0.0.1:9001".into()));
        assert_eq!(Endpoint::parse("http://localhost/RPC2").unwrap(), Endpoint::Tcp("localhost:80".into()));
        for bad in ["unix://", "http://", "https://x:1", "/tmp/s.sock"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_not_in_debug() {
        let t = Transport::new("http://127.0.0.1:1", Some("u"), Some(&Secret::new("hunter2")), Duration::from_secs(1))
            .unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("aHVudGVy"), "{shown}");
    }
}
