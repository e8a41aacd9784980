//! The EC2 client (`lb::ec2`, DescribeInstances spoken directly) against a scripted HTTP server on
//! 127.0.0.1, for what moto cannot show: throttling and retries, pages beyond its instance count,
//! a malformed answer, and the SigV4 signature, which moto does not check; it is recomputed here
//! with botocore (the AWS SDK for Python, in the test venv through moto) from the request as sent.
//! The happy path against moto is in tests/elb_moto.rs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use elb_quorum::identity::AwsFailure;
use elb_quorum::lb::ec2::Ec2;

/// A request as the server read it.
#[derive(Debug, Clone)]
struct Seen {
    head: Vec<(String, String)>,
    path: String,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Serves one scripted answer per connection, in order; records each request.
fn server(answers: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for (status, body) in answers {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let mut head = Vec::new();
            loop {
                let mut l = String::new();
                reader.read_line(&mut l).unwrap();
                let l = l.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                head.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            let len: usize = head
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut buf = vec![0; len];
            reader.read_exact(&mut buf).unwrap();
            record.lock().unwrap().push(Seen { head, path, body: String::from_utf8(buf).unwrap() });
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (url, seen)
}

fn client(url: &str, session_token: Option<&str>) -> Ec2 {
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        session_token.map(String::from),
        None,
        "test",
    );
    let config = aws_config::SdkConfig::builder()
        .region(aws_config::Region::new("eu-west-1"))
        .endpoint_url(url)
        .credentials_provider(SharedCredentialsProvider::new(creds))
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    Ec2::new(&config)
}

fn page(ids: &[&str], token: Option<&str>) -> String {
    let items: String = ids
        .iter()
        .map(|id| {
            format!(
                "<item><instanceId>{id}</instanceId><placement><availabilityZone>eu-west-1a</availabilityZone></placement>\
                 <tagSet><item><key>Name</key><value>{id}.web.example.com</value></item></tagSet></item>"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\"?><DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
         <requestId>r</requestId><reservationSet><item><instancesSet>{items}</instancesSet></item></reservationSet>{}\
         </DescribeInstancesResponse>",
        token.map(|t| format!("<nextToken>{t}</nextToken>")).unwrap_or_default()
    )
}

fn error(code: &str) -> String {
    format!("<Response><Errors><Error><Code>{code}</Code><Message>{code} said</Message></Error></Errors><RequestID>r</RequestID></Response>")
}

fn filters() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("tag:Name", vec!["*.web.example.com".to_owned()]),
        ("instance-state-name", vec!["running".into(), "stopped".into()]),
    ]
}

fn form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            let dec = |s: &str| {
                let s = s.replace('+', " ");
                let mut out = Vec::new();
                let b = s.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        out.push(b[i]);
                        i += 1;
                    }
                }
                String::from_utf8(out).unwrap()
            };
            (dec(k), dec(v))
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn pages_are_followed_and_throttling_is_retried() {
    let (url, seen) = server(vec![
        (503, error("RequestLimitExceeded")),
        (200, page(&["i-1", "i-2"], Some("next/1"))),
        (500, error("InternalError")),
        (200, page(&["i-3"], None)),
    ]);
    let got = client(&url, None).describe_instances(&filters()).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["i-1", "i-2", "i-3"]);
    assert_eq!(got[0].zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(got[2].name.as_deref(), Some("i-3.web.example.com"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "one retry per failure: {seen:?}");
    let first = form(&seen[0].body);
    for want in [
        ("Action", "DescribeInstances"),
        ("Version", "2016-11-15"),
        ("Filter.1.Name", "tag:Name"),
        ("Filter.1.Value.1", "*.web.example.com"),
        ("Filter.2.Name", "instance-state-name"),
        ("Filter.2.Value.2", "stopped"),
    ] {
        assert!(first.iter().any(|(k, v)| (k.as_str(), v.as_str()) == want), "{want:?} not in {first:?}");
    }
    assert!(!first.iter().any(|(k, _)| k == "NextToken"));
    assert!(form(&seen[3].body).iter().any(|(k, v)| k == "NextToken" && v == "next/1"), "{:?}", seen[3]);
}

#[tokio::test(flavor = "current_thread")]
async fn final_errors_are_not_retried_and_keep_their_code() {
    let (url, seen) = server(vec![(403, error("UnauthorizedOperation"))]);
    let e = client(&url, None).describe_instances(&filters()).await.unwrap_err();
    assert!(
        matches!(&e, AwsFailure::Service { code, server_error: false, .. } if code == "UnauthorizedOperation"),
        "{e:?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Throttled three times: the standard mode's three attempts, then the failure.
    let (url, seen) = server(vec![(503, error("RequestLimitExceeded")); 3]);
    let e = client(&url, None).describe_instances(&filters()).await.unwrap_err();
    assert!(matches!(&e, AwsFailure::Service { code, .. } if code == "RequestLimitExceeded"), "{e:?}");
    assert_eq!(seen.lock().unwrap().len(), 3);

    // A 200 that is not EC2's answer (a proxy's page): an error, never an empty cluster.
    let (url, _) = server(vec![(200, "<html>hello</html>".into()); 3]);
    let e = client(&url, None).describe_instances(&filters()).await.unwrap_err();
    assert!(matches!(&e, AwsFailure::Service { code, .. } if code == "MalformedResponse"), "{e:?}");

    // Nobody listening: unreachable.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = client(&format!("http://127.0.0.1:{port}"), None).describe_instances(&filters()).await.unwrap_err();
    assert!(matches!(e, AwsFailure::Unreachable(_)), "{e:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_signature_is_what_botocore_computes_for_the_same_request() {
    for token in [None, Some("session-token-123")] {
        let (url, seen) = server(vec![(200, page(&["i-1"], None))]);
        client(&url, token).describe_instances(&filters()).await.unwrap();
        let req = seen.lock().unwrap()[0].clone();
        assert_eq!(req.path, "/");
        let auth = req.header("authorization").expect("Authorization header").to_owned();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
        assert!(auth.contains("/eu-west-1/ec2/aws4_request"), "{auth}");
        assert_eq!(req.header("x-amz-security-token"), token);
        let signed: Vec<&str> =
            auth.split("SignedHeaders=").nth(1).unwrap().split(',').next().unwrap().split(';').collect();
        let signature = auth.split("Signature=").nth(1).unwrap();
        let headers: Vec<(String, String)> = signed
            .iter()
            .map(|h| (h.to_string(), req.header(h).unwrap_or_else(|| panic!("signed {h} not sent")).to_owned()))
            .collect();
        let script = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
r = json.load(sys.stdin)
req = AWSRequest(method="POST", url=r["url"], data=r["body"].encode(), headers=dict(r["headers"]))
req.context["timestamp"] = dict(r["headers"])["x-amz-date"]
auth = SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", r["token"]), "ec2", "eu-west-1")
print(auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req))
"#;
        let input = serde_json::json!({"url": format!("{url}/"), "body": req.body, "headers": headers, "token": token});
        let mut child = Command::new(common::python())
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python from the test venv");
        child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "botocore (from moto in the test venv: {})", common::INSTALL_HINT);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), signature, "signed headers {signed:?}");
    }
}
