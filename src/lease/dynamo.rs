//! `PermitStore` on a DynamoDB table (hash key `pk`, a string) through `aws-sdk-dynamodb`. Every
//! attribute name goes through a placeholder (`#h` holders, `#v` ver, `#id` one holder), so no name
//! can collide with DynamoDB's reserved words. All `SdkError` mapping happens here.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;

use crate::identity::{aws_failure, AwsFailure};

use super::{BoxFuture, Holder, Kind, LeaseError, PermitStore, Record, Write, Written};

/// One attempt may take this long before it counts as a timeout (fail closed, retried by the SDK).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// A whole call, retries included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The permit table.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

impl DynamoStore {
    pub fn new(config: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        let timeouts =
            TimeoutConfig::builder().operation_attempt_timeout(ATTEMPT_TIMEOUT).operation_timeout(CALL_TIMEOUT).build();
        let conf = aws_sdk_dynamodb::config::Builder::from(config).timeout_config(timeouts).build();
        Self { client: Client::from_conf(conf), table: table.into() }
    }

    fn map<E>(&self, action: &'static str, err: SdkError<E, HttpResponse>) -> LeaseError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let table = self.table.clone();
        match aws_failure(&err) {
            AwsFailure::Service { code, message, server_error } => match code.as_str() {
                "ResourceNotFoundException" => LeaseError::NoTable { table },
                "AccessDeniedException" | "UnrecognizedClientException" => {
                    LeaseError::AccessDenied { table, action, message }
                }
                "ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded" => {
                    LeaseError::Throttled { table, action }
                }
                "TransactionConflictException" => {
                    LeaseError::Unavailable { table, action, detail: format!("{code}: {message}") }
                }
                _ if server_error => LeaseError::Unavailable { table, action, detail: format!("{code}: {message}") },
                _ => LeaseError::Rejected { table, action, code, message },
            },
            AwsFailure::Credentials(detail) => LeaseError::Credentials { table, action, detail },
            AwsFailure::Unreachable(detail) => LeaseError::Unavailable { table, action, detail },
        }
    }

    async fn load(&self, key: &str) -> Result<Option<Record>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.map("GetItem", e))?;
        out.item().map(decode).transpose().map_err(|detail| LeaseError::Malformed {
            table: self.table.clone(),
            key: key.into(),
            detail,
        })
    }

    async fn write(&self, key: &str, write: Write) -> Result<Written, LeaseError> {
        let n = |v: u64| AttributeValue::N(v.to_string());
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.into()))
            .expression_attribute_names("#h", "holders")
            .expression_attribute_names("#v", "ver")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        req = match write {
            Write::Create { id, holder } => req
                .update_expression("SET #h = :h, #v = :one")
                .condition_expression("attribute_not_exists(pk)")
                .expression_attribute_values(":h", AttributeValue::M(HashMap::from([(id, encode(&holder))])))
                .expression_attribute_values(":one", n(1)),
            Write::Put { ver, id, holder, prune } => {
                let mut update = "SET #h.#id = :e, #v = :next".to_owned();
                for (i, old) in prune.into_iter().enumerate() {
                    update.push_str(if i == 0 { " REMOVE " } else { ", " });
                    update.push_str(&format!("#h.#p{i}"));
                    req = req.expression_attribute_names(format!("#p{i}"), old);
                }
                req.update_expression(update)
                    .condition_expression("#v = :ver")
                    .expression_attribute_names("#id", id)
                    .expression_attribute_values(":e", encode(&holder))
                    .expression_attribute_values(":ver", n(ver))
                    .expression_attribute_values(":next", n(ver + 1))
            }
            Write::Renew { id, tok, exp } => req
                .update_expression("SET #h.#id.#exp = :exp, #v = #v + :one")
                .condition_expression("#h.#id.#tok = :tok")
                .expression_attribute_names("#id", id)
                .expression_attribute_names("#exp", "exp")
                .expression_attribute_names("#tok", "tok")
                .expression_attribute_values(":exp", n(exp))
                .expression_attribute_values(":tok", s(&tok))
                .expression_attribute_values(":one", n(1)),
            Write::Remove { id, tok } => req
                .update_expression("REMOVE #h.#id SET #v = #v + :one")
                .condition_expression("#h.#id.#tok = :tok")
                .expression_attribute_names("#id", id)
                .expression_attribute_names("#tok", "tok")
                .expression_attribute_values(":tok", s(&tok))
                .expression_attribute_values(":one", n(1)),
        };
        match req.send().await {
            Ok(_) => Ok(Written::Applied),
            Err(SdkError::ServiceError(se))
                if matches!(se.err(), UpdateItemError::ConditionalCheckFailedException(_)) =>
            {
                let UpdateItemError::ConditionalCheckFailedException(c) = se.err() else { unreachable!() };
                Ok(Written::Conflict(c.item().and_then(|item| decode(item).ok())))
            }
            Err(e) => Err(self.map("UpdateItem", e)),
        }
    }
}

impl PermitStore for DynamoStore {
    fn table(&self) -> &str {
        &self.table
    }
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, LeaseError>> {
        Box::pin(DynamoStore::load(self, key))
    }
    fn write<'a>(&'a self, key: &'a str, write: Write) -> BoxFuture<'a, Result<Written, LeaseError>> {
        Box::pin(DynamoStore::write(self, key, write))
    }
}

fn encode(h: &Holder) -> AttributeValue {
    AttributeValue::M(HashMap::from([
        ("tok".to_owned(), AttributeValue::S(h.tok.clone())),
        ("exp".to_owned(), AttributeValue::N(h.exp.to_string())),
        ("since".to_owned(), AttributeValue::N(h.since.to_string())),
        ("kind".to_owned(), AttributeValue::S(h.kind.as_str().to_owned())),
    ]))
}

fn number(v: Option<&AttributeValue>, what: &str) -> Result<u64, String> {
    match v {
        Some(AttributeValue::N(n)) => n.parse().map_err(|_| format!("{what} {n:?} is not a whole number")),
        _ => Err(format!("{what} is missing or not a number")),
    }
}

fn decode(item: &HashMap<String, AttributeValue>) -> Result<Record, String> {
    let ver = if item.contains_key("ver") { number(item.get("ver"), "ver")? } else { 0 };
    let mut record = Record { ver, holders: Default::default() };
    let holders = match item.get("holders") {
        None => return Ok(record),
        Some(AttributeValue::M(m)) => m,
        Some(_) => return Err("holders is not a map".into()),
    };
    for (id, v) in holders {
        let AttributeValue::M(e) = v else { return Err(format!("holder {id} is not a map")) };
        let tok = match e.get("tok") {
            Some(AttributeValue::S(t)) => t.clone(),
            _ => return Err(format!("holder {id}: tok is missing")),
        };
        let kind = match e.get("kind") {
            Some(AttributeValue::S(k)) => Kind::parse(k).ok_or_else(|| format!("holder {id}: kind {k:?}"))?,
            _ => return Err(format!("holder {id}: kind is missing")),
        };
        let exp = number(e.get("exp"), &format!("holder {id}: exp"))?;
        let since = number(e.get("since"), &format!("holder {id}: since"))?;
        record.holders.insert(id.clone(), Holder { tok, exp, since, kind });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_named() {
        let h = Holder { tok: "t1".into(), exp: 1_700_000_120_000, since: 1_700_000_000_000, kind: Kind::Exempt };
        let item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("web.example.com".into())),
            ("ver".to_owned(), AttributeValue::N("3".into())),
            ("holders".to_owned(), AttributeValue::M(HashMap::from([("i-1".to_owned(), encode(&h))]))),
        ]);
        let r = decode(&item).unwrap();
        assert_eq!((r.ver, r.holders.get("i-1")), (3, Some(&h)));
        let mut bad = item.clone();
        bad.insert(
            "holders".into(),
            AttributeValue::M(HashMap::from([("i-2".to_owned(), AttributeValue::S("x".into()))])),
        );
        assert_eq!(decode(&bad).unwrap_err(), "holder i-2 is not a map");
        let empty = HashMap::from([("pk".to_owned(), AttributeValue::S("k".into()))]);
        assert_eq!(decode(&empty).unwrap(), Record::default());
    }
}
