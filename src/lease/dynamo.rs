//! `PermitStore` on a DynamoDB table (hash key `pk`, a string) through `aws-sdk-dynamodb`. Every
//! attribute name goes through a placeholder (`#h` holders, `#x` exempt, `#v` ver, `#id` one
//! holder), so no name can collide with DynamoDB's reserved words. The shared view is a second
//! item of the same table (`pk` = key + `#view`), its head with the refresh lease a third (key +
//! `#vh`), and each shard of a spread record another (key + `#pN`). All `SdkError` mapping happens here.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;

use crate::identity::{aws_failure, AwsFailure};

use super::batch::{Batches, Claim, Way};
use super::{
    BoxFuture, Holder, Kind, LeaseError, Pace, PermitStore, Record, Shared, SharedWrite, Write, Written, VIEW_HANDOFF,
};

/// The entry of `exempt` that holds `np`, the cluster's shard count (`Write::Shards`): an entry
/// with no token, which a version that knows no shards reads as a malformed record and so fails
/// closed on, rather than count only shard 0's holders.
pub const SHARDS_ENTRY: &str = "~np";

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

    /// The item `key`, if any: a strongly consistent read when `consistent`.
    async fn get(&self, key: &str, consistent: bool) -> Result<Option<HashMap<String, AttributeValue>>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.into()))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(|e| self.map("GetItem", e))?;
        Ok(out.item)
    }

    async fn load(&self, key: &str) -> Result<Option<Record>, LeaseError> {
        let item = self.get(key, true).await?;
        item.as_ref().map(decode).transpose().map_err(|detail| LeaseError::Malformed {
            table: self.table.clone(),
            key: key.into(),
            detail,
        })
    }

    async fn write(&self, key: &str, write: Write) -> Result<Written, LeaseError> {
        let n = |v: u64| AttributeValue::N(v.to_string());
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.into()))
            .expression_attribute_names("#v", "ver")
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let req = match write {
            Write::Init => req
                .update_expression("SET #h = if_not_exists(#h, :empty), #x = if_not_exists(#x, :empty), #v = if_not_exists(#v, :zero) + :one")
                .expression_attribute_names("#h", "holders")
                .expression_attribute_names("#x", "exempt")
                .expression_attribute_values(":empty", AttributeValue::M(HashMap::new()))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":one", n(1)),
            Write::Claim { id, holder, limit, pace } => {
                let mut condition = "attribute_not_exists(#h.#id) AND attribute_not_exists(#x.#id)".to_owned();
                let map = if holder.kind == Kind::Slot { "#h" } else { "#x" };
                let mut update = format!("SET {map}.#id = :e, #v = #v + :one");
                match &pace {
                    Some(Pace { new_window: true, .. }) => {
                        update.push_str(", #ws = :now, #wn = :one, #wq = :quota, #wqs = :now")
                    }
                    Some(Pace { new_window: false, .. }) => update.push_str(", #wn = #wn + :one"),
                    None => {}
                }
                let req = req
                    .update_expression(update)
                    .expression_attribute_names("#h", "holders")
                    .expression_attribute_names("#x", "exempt")
                    .expression_attribute_names("#id", id)
                    .expression_attribute_values(":e", encode(&holder))
                    .expression_attribute_values(":one", n(1));
                let req = match holder.kind {
                    Kind::Slot => {
                        condition.push_str(" AND size(#h) < :limit");
                        req.expression_attribute_values(":limit", n(limit as u64))
                    }
                    Kind::Exempt => req,
                };
                let req = match pace {
                    Some(p) => {
                        let req = req
                            .expression_attribute_names("#ws", "ws")
                            .expression_attribute_names("#wn", "wn")
                            .expression_attribute_values(":ws", n(p.window_start))
                            .expression_attribute_values(":quota", n(p.quota.into()));
                        if p.new_window {
                            condition.push_str(" AND (attribute_not_exists(#ws) OR #ws = :ws)");
                            req.expression_attribute_names("#wq", "wq")
                                .expression_attribute_names("#wqs", "wqs")
                                .expression_attribute_values(":now", n(holder.since))
                        } else {
                            condition.push_str(" AND #ws = :ws AND #wn < :quota");
                            req
                        }
                    }
                    None => req,
                };
                req.condition_expression(condition)
            }
            Write::Renew { id, tok, exp, kind } => req
                .update_expression("SET #m.#id.#exp = :exp, #v = #v + :one")
                .condition_expression("#m.#id.#tok = :tok")
                .expression_attribute_names("#m", map_name(kind))
                .expression_attribute_names("#id", id)
                .expression_attribute_names("#exp", "exp")
                .expression_attribute_names("#tok", "tok")
                .expression_attribute_values(":exp", n(exp))
                .expression_attribute_values(":tok", s(&tok))
                .expression_attribute_values(":one", n(1)),
            Write::Remove { id, tok, kind } => req
                .update_expression("REMOVE #m.#id SET #v = #v + :one")
                .condition_expression("#m.#id.#tok = :tok")
                .expression_attribute_names("#m", map_name(kind))
                .expression_attribute_names("#id", id)
                .expression_attribute_names("#tok", "tok")
                .expression_attribute_values(":tok", s(&tok))
                .expression_attribute_values(":one", n(1)),
            Write::Ask { id, tok, kind, way, elems } => req
                .update_expression("ADD #set :elems SET #v = #v + :one")
                .condition_expression("#m.#id.#tok = :tok")
                .expression_attribute_names("#m", map_name(kind))
                .expression_attribute_names("#id", id)
                .expression_attribute_names("#tok", "tok")
                .expression_attribute_names(
                    "#set",
                    match way {
                        Way::Out => "wo",
                        Way::In => "wi",
                    },
                )
                .expression_attribute_values(":elems", strings(&elems))
                .expression_attribute_values(":tok", s(&tok))
                .expression_attribute_values(":one", n(1)),
            Write::Withdraw { id, elems, stale } => {
                let req = req
                    .condition_expression("attribute_not_exists(#bt) OR #bu < :stale OR NOT contains(#bi, :id)")
                    .expression_attribute_names("#wd", "wd")
                    .expression_attribute_names("#bt", "bt")
                    .expression_attribute_names("#bu", "bu")
                    .expression_attribute_names("#bi", "bi")
                    .expression_attribute_values(":stale", n(stale))
                    .expression_attribute_values(":id", s(&id))
                    .expression_attribute_values(":one", n(1));
                // DELETE takes no empty set: a withdrawal whose elements are in another shard
                // (`Write::Forget` there) only counts itself here.
                match elems.is_empty() {
                    true => req.update_expression("ADD #wd :one SET #v = #v + :one"),
                    false => req
                        .update_expression("DELETE #wo :elems, #wi :elems ADD #wd :one SET #v = #v + :one")
                        .expression_attribute_names("#wo", "wo")
                        .expression_attribute_names("#wi", "wi")
                        .expression_attribute_values(":elems", strings(&elems)),
                }
            }
            Write::Forget { elems } => req
                .update_expression("DELETE #wo :elems, #wi :elems SET #v = if_not_exists(#v, :zero) + :one")
                .expression_attribute_names("#wo", "wo")
                .expression_attribute_names("#wi", "wi")
                .expression_attribute_values(":elems", strings(&elems))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":one", n(1)),
            Write::Shards { n: shards } => req
                .update_expression("SET #x.#np = :np, #v = #v + :one")
                .condition_expression("attribute_exists(#x) AND (attribute_not_exists(#x.#np) OR #x.#np.#k < :n)")
                .expression_attribute_names("#x", "exempt")
                .expression_attribute_names("#np", SHARDS_ENTRY)
                .expression_attribute_names("#k", "n")
                .expression_attribute_values(":np", AttributeValue::M(HashMap::from([("n".to_owned(), n(shards as u64))])))
                .expression_attribute_values(":n", n(shards as u64))
                .expression_attribute_values(":one", n(1)),
            Write::TakeBatch { claim, now, stale, withdrawals } => {
                let counted = if withdrawals == 0 { "attribute_not_exists(#wd)" } else { "#wd = :wd" };
                let req = req
                    .update_expression("SET #bt = :tok, #bu = :until, #bi = :ids, #v = #v + :one")
                    .condition_expression(format!(
                        "(attribute_not_exists(#bt) OR #bu < :stale) AND (attribute_not_exists(#bn) OR #bn <= :now) AND {counted}"
                    ))
                    .expression_attribute_names("#bt", "bt")
                    .expression_attribute_names("#bu", "bu")
                    .expression_attribute_names("#bi", "bi")
                    .expression_attribute_names("#bn", "bn")
                    .expression_attribute_names("#wd", "wd")
                    .expression_attribute_values(":tok", s(&claim.tok))
                    .expression_attribute_values(":until", n(claim.until))
                    .expression_attribute_values(":ids", strings(&claim.ids))
                    .expression_attribute_values(":stale", n(stale))
                    .expression_attribute_values(":now", n(now))
                    .expression_attribute_values(":one", n(1));
                match withdrawals {
                    0 => req,
                    w => req.expression_attribute_values(":wd", n(w)),
                }
            }
            Write::EndBatch { tok, out, back, next } => {
                // DELETE takes no empty set: only the sets with something done.
                let mut deletes = Vec::new();
                let mut req = req
                    .expression_attribute_names("#bt", "bt")
                    .expression_attribute_names("#bu", "bu")
                    .expression_attribute_names("#bi", "bi")
                    .expression_attribute_names("#bn", "bn")
                    .expression_attribute_values(":tok", s(&tok))
                    .expression_attribute_values(":next", n(next))
                    .expression_attribute_values(":one", n(1));
                for (name, placeholder, done) in [("wo", ":out", &out), ("wi", ":back", &back)] {
                    if !done.is_empty() {
                        deletes.push(format!("#{name} {placeholder}"));
                        req = req
                            .expression_attribute_names(format!("#{name}"), name)
                            .expression_attribute_values(placeholder, strings(done));
                    }
                }
                let mut update = "REMOVE #bt, #bu, #bi SET #bn = :next, #v = #v + :one".to_owned();
                if !deletes.is_empty() {
                    update.push_str(&format!(" DELETE {}", deletes.join(", ")));
                }
                req.update_expression(update).condition_expression("#bt = :tok")
            }
        };
        match req.send().await {
            Ok(out) => {
                let item = out.attributes().cloned().unwrap_or_default();
                decode(&item).map(Written::Applied).map_err(|detail| LeaseError::Malformed {
                    table: self.table.clone(),
                    key: key.into(),
                    detail,
                })
            }
            Err(e) => match condition_failed(&e) {
                Some(c) => Ok(Written::Conflict(c.item().and_then(|item| decode(item).ok()))),
                None => Err(self.map("UpdateItem", e)),
            },
        }
    }

    async fn load_shared(&self, key: &str) -> Result<Option<Shared>, LeaseError> {
        // Eventually consistent is enough: a reader checks the version the view followed.
        let Some(item) = self.get(key, false).await? else { return Ok(None) };
        let num = |name: &str| number_or_zero(&item, name);
        let malformed = |detail: String| LeaseError::Malformed { table: self.table.clone(), key: key.into(), detail };
        let data = match item.get("d") {
            Some(AttributeValue::S(d)) => d.clone(),
            None => String::new(),
            Some(_) => return Err(malformed("d is not a string".into())),
        };
        let seen = match item.get("svs") {
            None => Vec::new(),
            Some(AttributeValue::S(v)) if v.is_empty() => Vec::new(),
            Some(AttributeValue::S(v)) => v
                .split(',')
                .map(|x| x.parse().map_err(|_| malformed(format!("svs {v:?} is not a list of numbers"))))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(malformed("svs is not a string".into())),
        };
        Ok(Some(Shared {
            seen_ver: num("sv").map_err(malformed)?,
            seen,
            n: num("n").map_err(malformed)?,
            at: num("at").map_err(malformed)?,
            data,
            lease_until: num("lu").map_err(malformed)?,
            lease_holder: match item.get("lh") {
                Some(AttributeValue::S(h)) => h.clone(),
                None => String::new(),
                Some(_) => return Err(malformed("lh is not a string".into())),
            },
        }))
    }

    async fn write_shared(&self, key: &str, write: SharedWrite) -> Result<bool, LeaseError> {
        let n = |v: u64| AttributeValue::N(v.to_string());
        let req = self.client.update_item().table_name(&self.table).key("pk", AttributeValue::S(key.into()));
        let req = match write {
            SharedWrite::Lease { now, until, me } => req
                .update_expression("SET #lu = :until, #lh = :me")
                .condition_expression("attribute_not_exists(#lu) OR #lu < :open OR (#lu < :now AND #lh = :me)")
                .expression_attribute_names("#lu", "lu")
                .expression_attribute_names("#lh", "lh")
                .expression_attribute_values(":until", n(until))
                .expression_attribute_values(":me", AttributeValue::S(me))
                .expression_attribute_values(":open", n(now.saturating_sub(VIEW_HANDOFF.as_millis() as u64)))
                .expression_attribute_values(":now", n(now)),
            SharedWrite::Publish { seen_ver, seen, at, data } => req
                .update_expression(
                    "SET #sv = :sv, #svs = :svs, #at = :at, #d = :d, #n = if_not_exists(#n, :zero) + :one",
                )
                .condition_expression("attribute_not_exists(#sv) OR #sv <= :sv")
                .expression_attribute_names("#sv", "sv")
                .expression_attribute_names("#svs", "svs")
                .expression_attribute_values(":svs", svs(&seen))
                .expression_attribute_names("#at", "at")
                .expression_attribute_names("#d", "d")
                .expression_attribute_names("#n", "n")
                .expression_attribute_values(":sv", n(seen_ver))
                .expression_attribute_values(":at", n(at))
                .expression_attribute_values(":d", AttributeValue::S(data))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":one", n(1)),
            SharedWrite::Head { n: number, seen_ver, seen, at } => req
                .update_expression("SET #n = :n, #sv = :sv, #svs = :svs, #at = :at")
                .condition_expression("attribute_not_exists(#n) OR #n < :n")
                .expression_attribute_names("#n", "n")
                .expression_attribute_names("#sv", "sv")
                .expression_attribute_names("#svs", "svs")
                .expression_attribute_names("#at", "at")
                .expression_attribute_values(":n", n(number))
                .expression_attribute_values(":sv", n(seen_ver))
                .expression_attribute_values(":svs", svs(&seen))
                .expression_attribute_values(":at", n(at)),
        };
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e).is_some() => Ok(false),
            Err(e) => Err(self.map("UpdateItem", e)),
        }
    }
}

/// Every shard's version as stored in `svs` (a string: `3,7,4`; empty for one item).
fn svs(seen: &[u64]) -> AttributeValue {
    AttributeValue::S(seen.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
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
    fn load_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Shared>, LeaseError>> {
        Box::pin(DynamoStore::load_shared(self, key))
    }
    fn write_shared<'a>(&'a self, key: &'a str, write: SharedWrite) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(DynamoStore::write_shared(self, key, write))
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

/// A string set (never empty: DynamoDB has none).
fn strings(items: &std::collections::BTreeSet<String>) -> AttributeValue {
    AttributeValue::Ss(items.iter().cloned().collect())
}

/// Attribute `name` of `item` as a string set, empty when the item has none.
fn string_set(
    item: &HashMap<String, AttributeValue>,
    name: &str,
) -> Result<std::collections::BTreeSet<String>, String> {
    match item.get(name) {
        None => Ok(Default::default()),
        Some(AttributeValue::Ss(v)) => Ok(v.iter().cloned().collect()),
        Some(_) => Err(format!("{name} is not a string set")),
    }
}

/// The batches' attributes (`batch.rs`): `wo`, `wi`, the claim `bt`/`bu`/`bi`, `bn`, `wd`.
fn decode_batches(item: &HashMap<String, AttributeValue>) -> Result<Batches, String> {
    let claim = match item.get("bt") {
        None => None,
        Some(AttributeValue::S(tok)) => {
            Some(Claim { tok: tok.clone(), until: number(item.get("bu"), "bu")?, ids: string_set(item, "bi")? })
        }
        Some(_) => return Err("bt is not a string".into()),
    };
    Ok(Batches {
        want_out: string_set(item, "wo")?,
        want_in: string_set(item, "wi")?,
        claim,
        next: number_or_zero(item, "bn")?,
        withdrawals: number_or_zero(item, "wd")?,
    })
}

fn number(v: Option<&AttributeValue>, what: &str) -> Result<u64, String> {
    match v {
        Some(AttributeValue::N(n)) => n.parse().map_err(|_| format!("{what} {n:?} is not a whole number")),
        _ => Err(format!("{what} is missing or not a number")),
    }
}

/// Attribute `name` of `item` as a number, 0 when the item has none.
fn number_or_zero(item: &HashMap<String, AttributeValue>, name: &str) -> Result<u64, String> {
    if item.contains_key(name) {
        number(item.get(name), name)
    } else {
        Ok(0)
    }
}

/// The map an entry of `kind` is stored in.
fn map_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Slot => "holders",
        Kind::Exempt => "exempt",
    }
}

/// The failed condition of a conditional write, if that is why it failed.
fn condition_failed(
    e: &SdkError<UpdateItemError, HttpResponse>,
) -> Option<&aws_sdk_dynamodb::types::error::ConditionalCheckFailedException> {
    match e {
        SdkError::ServiceError(se) => match se.err() {
            UpdateItemError::ConditionalCheckFailedException(c) => Some(c),
            _ => None,
        },
        _ => None,
    }
}

/// The record from its item: slots in `holders`, exemptions in `exempt`. An entry's map decides its
/// kind (an entry of kind `exempt` in `holders`, from a version before the two maps, counts as the
/// slot it takes in `size(holders)`).
fn decode(item: &HashMap<String, AttributeValue>) -> Result<Record, String> {
    let ver = number_or_zero(item, "ver")?;
    let mut record = Record {
        ver,
        holders: Default::default(),
        complete: item.contains_key("holders") && item.contains_key("exempt"),
        window_start: number_or_zero(item, "ws")?,
        window_grants: number_or_zero(item, "wn")?.try_into().map_err(|_| "wn is too large".to_string())?,
        window_quota: None,
        batches: decode_batches(item)?,
        ..Record::default()
    };
    // A quota set for another window (a version without quotas began the current one) is not this
    // window's.
    if item.contains_key("wq") && number_or_zero(item, "wqs")? == record.window_start {
        record.window_quota = Some(number_or_zero(item, "wq")?.try_into().map_err(|_| "wq is too large".to_string())?);
    }
    for (name, kind) in [("holders", Kind::Slot), ("exempt", Kind::Exempt)] {
        let entries = match item.get(name) {
            None => continue,
            Some(AttributeValue::M(m)) => m,
            Some(_) => return Err(format!("{name} is not a map")),
        };
        for (id, v) in entries {
            let AttributeValue::M(e) = v else { return Err(format!("holder {id} is not a map")) };
            if kind == Kind::Exempt && id == SHARDS_ENTRY {
                record.shards = number(e.get("n"), "np")?.try_into().map_err(|_| "np is too large".to_string())?;
                continue;
            }
            let tok = match e.get("tok") {
                Some(AttributeValue::S(t)) => t.clone(),
                _ => return Err(format!("holder {id}: tok is missing")),
            };
            let exp = number(e.get("exp"), &format!("holder {id}: exp"))?;
            let since = number(e.get("since"), &format!("holder {id}: since"))?;
            record.holders.insert(id.clone(), Holder { tok, exp, since, kind });
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_named() {
        let slot = Holder { tok: "t1".into(), exp: 1_700_000_120_000, since: 1_700_000_000_000, kind: Kind::Slot };
        let exempt = Holder { tok: "t2".into(), kind: Kind::Exempt, ..slot.clone() };
        let item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("web.example.com".into())),
            ("ver".to_owned(), AttributeValue::N("3".into())),
            ("holders".to_owned(), AttributeValue::M(HashMap::from([("i-1".to_owned(), encode(&slot))]))),
            ("exempt".to_owned(), AttributeValue::M(HashMap::from([("i-2".to_owned(), encode(&exempt))]))),
        ]);
        let r = decode(&item).unwrap();
        assert_eq!(
            (r.ver, r.holders.get("i-1"), r.holders.get("i-2"), r.complete),
            (3, Some(&slot), Some(&exempt), true)
        );
        // The map decides the kind: an exemption stored in `holders` takes a slot there.
        let mut legacy = item.clone();
        legacy.remove("exempt");
        legacy.insert("holders".into(), AttributeValue::M(HashMap::from([("i-2".to_owned(), encode(&exempt))])));
        let r = decode(&legacy).unwrap();
        assert_eq!((r.holders["i-2"].kind, r.complete), (Kind::Slot, false));
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
