//! EC2's `DescribeInstances`, the one EC2 call elb-quorum makes (the cluster's members by `Name`
//! tag), spoken directly: a form-encoded POST signed with SigV4 (aws-sigv4), sent over hyper with
//! rustls, its XML answer read for the few fields used. The generated `aws-sdk-ec2` crate would do
//! the same, but it alone took 4 of the 8 minutes and most of the 6.9 GB of a release build
//! (benches/README.md, "Build").
//!
//! It follows the SDK where the SDK's behaviour matters: credentials, region and endpoint from the
//! shared `SdkConfig` (`AWS_ENDPOINT_URL_EC2` and `AWS_ENDPOINT_URL` honoured), its retry settings
//! (the product sets 5 attempts from 0.5 s: throttling, 5xx and transport errors are tried again
//! after exponential backoff with full jitter; the adaptive mode's client-side rate limiter is not
//! reproduced, one call per check does not need it), and the same failure kinds (`AwsFailure`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::sync::Mutex;

use crate::cycle::chain;
use crate::identity::AwsFailure;

/// The EC2 API version the requests name (the current one; its `DescribeInstances` is stable).
const API_VERSION: &str = "2016-11-15";
/// Retries when the shared config names none: the SDK's standard mode.
const DEFAULT_ATTEMPTS: u32 = 3;
const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// One attempt's limit, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Credentials closer than this to their expiry are fetched again.
const CREDENTIALS_REFRESH: Duration = Duration::from_secs(300);

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One instance as `DescribeInstances` lists it (only what membership uses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub zone: Option<String>,
    pub name: Option<String>,
}

/// A minimal EC2 client.
#[derive(Clone)]
pub struct Ec2 {
    /// Built at the first call, shared by the clones.
    http: Arc<OnceLock<HttpsClient>>,
    endpoint: Result<String, String>,
    region: Option<String>,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    /// Attempts per call and the first backoff, from the shared config's retry settings.
    attempts: u32,
    backoff: Duration,
    cached: Arc<Mutex<Option<Credentials>>>,
}

impl std::fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2").field("endpoint", &self.endpoint).field("region", &self.region).finish_non_exhaustive()
    }
}

/// The endpoint: `AWS_ENDPOINT_URL_EC2`, else the shared config's (`AWS_ENDPOINT_URL` or the
/// profile's), else the region's public one.
fn endpoint(config: &aws_config::SdkConfig, region: Option<&str>) -> Result<String, String> {
    if let Ok(url) = std::env::var("AWS_ENDPOINT_URL_EC2") {
        if !url.is_empty() {
            return Ok(url);
        }
    }
    if let Some(url) = config.endpoint_url() {
        return Ok(url.to_owned());
    }
    let region = region.ok_or("no AWS region: set AWS_REGION or the profile's region (IMDS gives it on EC2)")?;
    let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    Ok(format!("https://ec2.{region}.{suffix}"))
}

impl Ec2 {
    /// Reads only the shared config: the HTTPS client (and the machine's root certificates) is
    /// built at the first call, so a listener that never reads the members pays nothing for it.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        let region = config.region().map(|r| r.as_ref().to_owned());
        Ec2 {
            http: Arc::default(),
            endpoint: endpoint(config, region.as_deref()),
            region,
            credentials: config.credentials_provider(),
            attempts: config.retry_config().map_or(DEFAULT_ATTEMPTS, |r| r.max_attempts().max(1)),
            backoff: config.retry_config().map_or(DEFAULT_BACKOFF, |r| r.initial_backoff()),
            cached: Arc::default(),
        }
    }

    fn http(&self) -> &HttpsClient {
        self.http.get_or_init(https_client)
    }

    async fn credentials(&self) -> Result<Credentials, AwsFailure> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            let fresh = c.expiry().is_none_or(|exp| exp > SystemTime::now() + CREDENTIALS_REFRESH);
            if fresh {
                return Ok(c.clone());
            }
        }
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| AwsFailure::Credentials("no credentials provider configured".into()))?;
        let c = provider.provide_credentials().await.map_err(|e| AwsFailure::Credentials(e.to_string()))?;
        *cached = Some(c.clone());
        Ok(c)
    }

    /// Every instance matching `filters` (name → values), all pages.
    pub async fn describe_instances(&self, filters: &[(&str, Vec<String>)]) -> Result<Vec<Instance>, AwsFailure> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let body = self.call(describe_instances_form(filters, token.as_deref())).await?;
            let page = parse_describe_instances(&body).map_err(|detail| AwsFailure::Service {
                code: "MalformedResponse".into(),
                message: detail,
                server_error: true,
            })?;
            out.extend(page.instances);
            match page.next_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// One call, with the configured attempts.
    async fn call(&self, form: String) -> Result<String, AwsFailure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(&form)).await {
                Ok(r) => r,
                Err(_) => Err(AwsFailure::Unreachable(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()))),
            };
            match result {
                Err(e) if attempt < self.attempts && retryable(&e) => {
                    // Full jitter, as the SDK: a random pause up to backoff × 2^(attempt−1), at most 20 s.
                    let cap = (self.backoff * (1u32 << (attempt - 1).min(16))).min(MAX_BACKOFF);
                    tokio::time::sleep(cap.mul_f64(fastrand::f64())).await;
                }
                other => return other,
            }
        }
    }

    async fn attempt(&self, form: &str) -> Result<String, AwsFailure> {
        let endpoint = self.endpoint.clone().map_err(AwsFailure::Unreachable)?;
        let region = self.region.as_deref().ok_or_else(|| {
            AwsFailure::Unreachable("no AWS region: set AWS_REGION or the profile's region".to_owned())
        })?;
        let uri: hyper::Uri =
            endpoint.parse().map_err(|e| AwsFailure::Unreachable(format!("EC2 endpoint {endpoint:?}: {e}")))?;
        let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let url = format!("{}://{host}/", uri.scheme_str().unwrap_or("https"));
        let credentials = self.credentials().await?;
        let req = signed_request(&url, &host, region, credentials, form)?;
        let resp = self.http().request(req).await.map_err(|e| AwsFailure::Unreachable(chain(&e)))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| AwsFailure::Unreachable(chain(&e)))?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            return Ok(body);
        }
        let (code, message) = parse_error(&body)
            .unwrap_or_else(|| (format!("HTTP{}", status.as_u16()), body.chars().take(200).collect()));
        Err(AwsFailure::Service { code, message, server_error: status.is_server_error() })
    }
}

/// hyper over rustls (aws-lc-rs, the machine's root certificates), HTTP/1.1, `http` allowed for an
/// emulator.
fn https_client() -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
        .map(|b| b.https_or_http().enable_http1().build());
    let connector = match connector {
        Ok(c) => c,
        // No root certificates on the machine: plain-HTTP endpoints (an emulator) still work,
        // an https one fails its handshake with that reason in the error.
        Err(e) => {
            tracing::warn!(error = %e, "no TLS root certificates found: HTTPS calls to EC2 will fail");
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(
                    rustls::ClientConfig::builder_with_provider(
                        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
                    )
                    .with_safe_default_protocol_versions()
                    .expect("the default provider supports the default versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
                .https_or_http()
                .enable_http1()
                .build()
        }
    };
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// `DescribeInstances`' form body (Query protocol).
fn describe_instances_form(filters: &[(&str, Vec<String>)], token: Option<&str>) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("Action", "DescribeInstances").append_pair("Version", API_VERSION);
    form.append_pair("MaxResults", "1000");
    for (i, (name, values)) in filters.iter().enumerate() {
        form.append_pair(&format!("Filter.{}.Name", i + 1), name);
        for (j, v) in values.iter().enumerate() {
            form.append_pair(&format!("Filter.{}.Value.{}", i + 1, j + 1), v);
        }
    }
    if let Some(t) = token {
        form.append_pair("NextToken", t);
    }
    form.finish()
}

/// The POST request with its SigV4 headers (synchronous: the signing settings are not `Sync`, so
/// they must not live across an await).
fn signed_request(
    url: &str,
    host: &str,
    region: &str,
    credentials: Credentials,
    form: &str,
) -> Result<hyper::Request<Full<Bytes>>, AwsFailure> {
    const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
    let identity = credentials.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("ec2")
        .time(SystemTime::now())
        .settings(aws_sigv4::http_request::SigningSettings::default())
        .build()
        .map_err(|e| AwsFailure::Credentials(e.to_string()))?
        .into();
    let headers = [("host", host), ("content-type", CONTENT_TYPE)];
    let signable = aws_sigv4::http_request::SignableRequest::new(
        "POST",
        url,
        headers.iter().copied(),
        aws_sigv4::http_request::SignableBody::Bytes(form.as_bytes()),
    )
    .map_err(|e| AwsFailure::Unreachable(format!("signing the EC2 request: {e}")))?;
    let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
        .map_err(|e| AwsFailure::Unreachable(format!("signing the EC2 request: {e}")))?
        .into_parts();
    let mut req = hyper::Request::post(url)
        .header("host", host)
        .header("content-type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(form.to_owned())))
        .map_err(|e| AwsFailure::Unreachable(format!("building the EC2 request: {e}")))?;
    instructions.apply_to_request_http1x(&mut req);
    Ok(req)
}

/// Throttling, AWS's own errors and no answer are tried again; everything else is final.
fn retryable(e: &AwsFailure) -> bool {
    match e {
        AwsFailure::Service { code, server_error, .. } => *server_error || crate::identity::is_throttling(code),
        AwsFailure::Unreachable(_) => true,
        AwsFailure::Credentials(_) => false,
    }
}

/// One page of `DescribeInstances`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub instances: Vec<Instance>,
    pub next_token: Option<String>,
}

/// Reads the fields used from a `DescribeInstancesResponse`.
pub fn parse_describe_instances(xml: &str) -> Result<Page, String> {
    const INSTANCE: &[&str] = &["DescribeInstancesResponse", "reservationSet", "item", "instancesSet", "item"];
    let mut page = Page::default();
    let mut current: Option<Instance> = None;
    let mut tag: (Option<String>, Option<String>) = (None, None);
    let mut root_seen = false;
    walk(xml, |event| match event {
        Xml::Open(path) => {
            root_seen |= path == ["DescribeInstancesResponse"];
            if path == INSTANCE {
                current = Some(Instance::default());
            }
        }
        Xml::Close(path, text) => {
            let rel = path.strip_prefix(INSTANCE);
            match (rel, current.as_mut()) {
                (Some([]), Some(_)) => page.instances.extend(current.take()),
                (Some(["instanceId"]), Some(i)) => i.id = text.to_owned(),
                (Some(["placement", "availabilityZone"]), Some(i)) => i.zone = Some(text.to_owned()),
                (Some(["tagSet", "item", "key"]), _) => tag.0 = Some(text.to_owned()),
                (Some(["tagSet", "item", "value"]), _) => tag.1 = Some(text.to_owned()),
                (Some(["tagSet", "item"]), Some(i)) => {
                    if let (Some(k), v) = std::mem::take(&mut tag) {
                        if k == "Name" {
                            i.name = Some(v.unwrap_or_default());
                        }
                    }
                }
                _ if path == ["DescribeInstancesResponse", "nextToken"] => page.next_token = Some(text.to_owned()),
                _ => {}
            }
        }
    })?;
    if !root_seen {
        return Err(format!("not a DescribeInstancesResponse: {}", xml.chars().take(120).collect::<String>()));
    }
    if let Some(i) = page.instances.iter().find(|i| i.id.is_empty()) {
        return Err(format!("an instance without instanceId: {i:?}"));
    }
    Ok(page)
}

/// An EC2 error answer's first code and message: `<Response><Errors><Error><Code>…`.
pub fn parse_error(xml: &str) -> Option<(String, String)> {
    let (mut code, mut message) = (None, None);
    walk(xml, |event| {
        if let Xml::Close(path, text) = event {
            match path.last() {
                Some(&"Code") if code.is_none() && path.contains(&"Error") => code = Some(text.to_owned()),
                Some(&"Message") if message.is_none() && path.contains(&"Error") => message = Some(text.to_owned()),
                _ => {}
            }
        }
    })
    .ok()?;
    Some((code?, message.unwrap_or_default()))
}

enum Xml<'a, 'x> {
    /// An element opened: the path to it, itself included.
    Open(&'a [&'x str]),
    /// An element closed: its path and its own text (entities decoded; empty for parents).
    Close(&'a [&'x str], &'a str),
}

/// A small XML walker for AWS's answers: elements, attributes skipped, text with the five named
/// entities and numeric references; declarations, comments and CDATA sections handled.
fn walk<'x>(xml: &'x str, mut on: impl FnMut(Xml<'_, 'x>)) -> Result<(), String> {
    let mut path: Vec<&'x str> = Vec::new();
    let mut text = String::new();
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        text.push_str(&decode(&rest[..lt])?);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<![CDATA[") {
            let end = after.find("]]>").ok_or("unterminated CDATA")?;
            text.push_str(&after[..end]);
            rest = &after[end + 3..];
            continue;
        }
        let (skip, close) = if rest.starts_with("<!--") {
            ("<!--", "-->")
        } else if rest.starts_with("<?") || rest.starts_with("<!") {
            ("<", ">")
        } else {
            ("", "")
        };
        if !skip.is_empty() {
            let end = rest.find(close).ok_or("unterminated declaration or comment")?;
            rest = &rest[end + close.len()..];
            continue;
        }
        let gt = rest.find('>').ok_or("unterminated tag")?;
        let inner = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = inner.strip_prefix('/') {
            let name = name.trim();
            match path.last() {
                Some(open) if *open == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            on(Xml::Close(&path, text.trim()));
            path.pop();
            text.clear();
        } else {
            let self_closing = inner.ends_with('/');
            let inner = inner.trim_end_matches('/');
            let name = inner.split(|c: char| c.is_ascii_whitespace()).next().unwrap_or_default();
            if name.is_empty() {
                return Err("an element without a name".into());
            }
            text.clear();
            path.push(name);
            on(Xml::Open(&path));
            if self_closing {
                on(Xml::Close(&path, ""));
                path.pop();
            }
        }
    }
    if !path.is_empty() {
        return Err(format!("unclosed elements: {path:?}"));
    }
    Ok(())
}

fn decode(s: &str) -> Result<String, String> {
    if !s.contains('&') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';').ok_or("an entity without ';'")? + amp;
        let entity = &rest[amp + 1..semi];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let n = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else {
                    entity.strip_prefix('#').and_then(|d| d.parse().ok())
                };
                n.and_then(char::from_u32).ok_or_else(|| format!("unknown entity &{entity};"))?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r1</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1</reservationId>
      <groupSet/>
      <instancesSet>
        <item>
          <instanceId>i-0a</instanceId>
          <instanceState><code>16</code><name>running</name></instanceState>
          <placement><availabilityZone>us-east-1a</availabilityZone><tenancy>default</tenancy></placement>
          <networkInterfaceSet><item><networkInterfaceId>eni-1</networkInterfaceId>
            <privateIpAddressesSet><item><privateIpAddress>10.0.0.1</privateIpAddress></item></privateIpAddressesSet>
          </item></networkInterfaceSet>
          <tagSet>
            <item><key>team</key><value>a &amp; b</value></item>
            <item><key>Name</key><value>node0.web.example.com</value></item>
          </tagSet>
        </item>
        <item>
          <instanceId>i-0b</instanceId>
          <placement><availabilityZone>us-east-1b</availabilityZone></placement>
          <tagSet><item><key>Name</key><value><![CDATA[node1.web.example.com]]></value></item></tagSet>
        </item>
      </instancesSet>
    </item>
    <item><reservationId>r-2</reservationId><instancesSet><item><instanceId>i-0c</instanceId></item></instancesSet></item>
  </reservationSet>
  <nextToken>tok&#x2F;2</nextToken>
</DescribeInstancesResponse>"#;

    #[test]
    fn a_page_gives_ids_zones_names_and_the_next_token() {
        let page = parse_describe_instances(PAGE).unwrap();
        assert_eq!(
            page.instances,
            vec![
                Instance {
                    id: "i-0a".into(),
                    zone: Some("us-east-1a".into()),
                    name: Some("node0.web.example.com".into())
                },
                Instance {
                    id: "i-0b".into(),
                    zone: Some("us-east-1b".into()),
                    name: Some("node1.web.example.com".into())
                },
                Instance { id: "i-0c".into(), zone: None, name: None },
            ]
        );
        assert_eq!(page.next_token.as_deref(), Some("tok/2"));
    }

    #[test]
    fn an_empty_answer_is_no_instances_and_no_token() {
        let xml = r#"<DescribeInstancesResponse xmlns="x"><requestId>1</requestId><reservationSet/></DescribeInstancesResponse>"#;
        assert_eq!(parse_describe_instances(xml).unwrap(), Page::default());
    }

    #[test]
    fn malformed_answers_are_errors_not_empty_clusters() {
        for bad in [
            "",
            "<html>proxy error</html>",
            "<DescribeInstancesResponse><reservationSet>",
            "<DescribeInstancesResponse><a></b></DescribeInstancesResponse>",
            "<DescribeInstancesResponse><reservationSet><item><instancesSet><item><placement/></item></instancesSet></item></reservationSet></DescribeInstancesResponse>",
            "<DescribeInstancesResponse>&bogus;</DescribeInstancesResponse>",
        ] {
            assert!(parse_describe_instances(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn error_answers_give_code_and_message() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>x</RequestID></Response>"#;
        assert_eq!(parse_error(xml), Some(("RequestLimitExceeded".into(), "Request limit exceeded.".into())));
        assert_eq!(parse_error("<html/>"), None);
    }

    #[test]
    fn throttling_5xx_and_no_answer_are_retried_the_rest_not() {
        let service =
            |code: &str, server_error| AwsFailure::Service { code: code.into(), message: String::new(), server_error };
        assert!(retryable(&service("RequestLimitExceeded", false)));
        assert!(retryable(&service("InternalError", true)));
        assert!(retryable(&AwsFailure::Unreachable("reset".into())));
        assert!(!retryable(&service("UnauthorizedOperation", false)));
        assert!(!retryable(&AwsFailure::Credentials("none".into())));
    }
}
