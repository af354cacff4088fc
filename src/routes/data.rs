//! The data a client posted with a route, kept small: a table holds 100 000 of them.
//!
//! A `serde_json::Map` (an `IndexMap` here, for CHP's key order) costs ~460 bytes for
//! `{"target": ...}`: its hash index, spare capacity, a heap string per key and 72 bytes per
//! `Value`. [`RouteData`] is a boxed slice of entries in posted order, found by a linear scan (a
//! route has a handful), whose common keys point at static strings and whose values are
//! [`DataValue`]s: strings and flags in 24 bytes, anything else boxed.

use std::borrow::Cow;
use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

/// Keys that JupyterHub and hubgate put on routes: stored without an allocation of their own.
const KNOWN_KEYS: [&str; 8] = [
    "target",
    "user",
    "server_name",
    "hub",
    "service",
    "host",
    "auth",
    "jupyterhub",
];

fn key(k: String) -> Cow<'static, str> {
    match KNOWN_KEYS.iter().find(|known| **known == k) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(k.into_boxed_str().into_string()),
    }
}

/// One value of a route's data. JupyterHub posts strings and flags; numbers, arrays and objects
/// are kept too, boxed.
#[derive(Clone, PartialEq)]
pub enum DataValue {
    Null,
    Bool(bool),
    String(Box<str>),
    /// A number, an array or an object.
    Other(Box<Value>),
}

impl DataValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            DataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_string(&self) -> bool {
        matches!(self, DataValue::String(_))
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            DataValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, DataValue::Null)
    }

    /// The value as JSON.
    pub fn to_value(&self) -> Value {
        match self {
            DataValue::Null => Value::Null,
            DataValue::Bool(b) => Value::Bool(*b),
            DataValue::String(s) => Value::String(s.to_string()),
            DataValue::Other(v) => (**v).clone(),
        }
    }
}

impl From<Value> for DataValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => DataValue::Null,
            Value::Bool(b) => DataValue::Bool(b),
            Value::String(s) => DataValue::String(s.into_boxed_str()),
            other => DataValue::Other(Box::new(other)),
        }
    }
}

impl From<DataValue> for Value {
    fn from(v: DataValue) -> Self {
        match v {
            DataValue::Null => Value::Null,
            DataValue::Bool(b) => Value::Bool(b),
            DataValue::String(s) => Value::String(s.into_string()),
            DataValue::Other(v) => *v,
        }
    }
}

impl PartialEq<Value> for DataValue {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (DataValue::Null, Value::Null) => true,
            (DataValue::Bool(a), Value::Bool(b)) => a == b,
            (DataValue::String(a), Value::String(b)) => **a == **b,
            (DataValue::Other(a), b) => **a == *b,
            _ => false,
        }
    }
}

impl PartialEq<str> for DataValue {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == Some(other)
    }
}

impl PartialEq<&str> for DataValue {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == Some(*other)
    }
}

impl PartialEq<bool> for DataValue {
    fn eq(&self, other: &bool) -> bool {
        self.as_bool() == Some(*other)
    }
}

impl fmt::Debug for DataValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataValue::Null => f.write_str("Null"),
            DataValue::Bool(b) => write!(f, "Bool({b})"),
            DataValue::String(s) => write!(f, "String({s:?})"),
            DataValue::Other(v) => fmt::Debug::fmt(v, f),
        }
    }
}

impl Serialize for DataValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DataValue::Null => s.serialize_unit(),
            DataValue::Bool(b) => s.serialize_bool(*b),
            DataValue::String(v) => s.serialize_str(v),
            DataValue::Other(v) => v.serialize(s),
        }
    }
}

/// A route's posted data (minus `last_activity`, which hubgate owns): keys in the order they
/// were posted, each once.
///
/// It answers what a `serde_json::Map` would for the operations routes need (`get`, `insert`,
/// indexing, iteration, equality regardless of order), with [`DataValue`]s for values, and
/// converts to and from a map.
#[derive(Clone, Default)]
pub struct RouteData {
    entries: Box<[(Cow<'static, str>, DataValue)]>,
}

impl RouteData {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&DataValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key`, in place when it is there already (as a map keeps its position), else at the
    /// end; returns the value it replaced.
    pub fn insert(&mut self, key: String, value: Value) -> Option<Value> {
        let value = DataValue::from(value);
        if let Some((_, v)) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(v, value).into());
        }
        let mut entries = std::mem::take(&mut self.entries).into_vec();
        entries.reserve_exact(1);
        entries.push((self::key(key), value));
        self.entries = entries.into_boxed_slice();
        None
    }

    /// Removes `key`, keeping the order of the others; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        let mut entries = std::mem::take(&mut self.entries).into_vec();
        let (_, value) = entries.remove(at);
        self.entries = entries.into_boxed_slice();
        Some(value.into())
    }

    /// The entries in posted order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &DataValue)> {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }

    /// A `serde_json::Map` with the same entries in the same order.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_value()))
            .collect()
    }
}

impl From<Map<String, Value>> for RouteData {
    fn from(map: Map<String, Value>) -> Self {
        RouteData {
            entries: map.into_iter().map(|(k, v)| (key(k), v.into())).collect(),
        }
    }
}

impl From<RouteData> for Map<String, Value> {
    fn from(data: RouteData) -> Self {
        data.entries
            .into_vec()
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into()))
            .collect()
    }
}

impl FromIterator<(String, Value)> for RouteData {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        let mut entries: Vec<(Cow<'static, str>, DataValue)> = Vec::new();
        for (k, v) in iter {
            match entries.iter_mut().find(|(known, _)| *known == k) {
                Some((_, old)) => *old = v.into(),
                None => entries.push((key(k), v.into())),
            }
        }
        RouteData {
            entries: entries.into_boxed_slice(),
        }
    }
}

impl<'a> IntoIterator for &'a RouteData {
    type Item = (&'a str, &'a DataValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Cow<'static, str>, DataValue)>,
        fn(&'a (Cow<'static, str>, DataValue)) -> (&'a str, &'a DataValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }
}

impl std::ops::Index<&str> for RouteData {
    type Output = DataValue;

    /// The value at `key`, or `null` when there is none (as indexing a `serde_json::Value`
    /// answers).
    fn index(&self, key: &str) -> &DataValue {
        static NULL: DataValue = DataValue::Null;
        self.get(key).unwrap_or(&NULL)
    }
}

/// Equal when both hold the same keys with the same values, in any order (as maps compare).
impl PartialEq for RouteData {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl Eq for RouteData {}

impl PartialEq<Map<String, Value>> for RouteData {
    fn eq(&self, other: &Map<String, Value>) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .all(|(k, v)| other.get(k).is_some_and(|o| v == o))
    }
}

impl fmt::Debug for RouteData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for RouteData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn behaves_as_the_map_it_came_from() {
        let posted = map(json!({"target": "http://t/", "user": "alice", "extra": [1, 2]}));
        let mut data = RouteData::from(posted.clone());
        assert_eq!(data, posted);
        assert_eq!(data["user"], "alice");
        assert!(data["nothing"].is_null());
        assert_eq!(data["extra"], json!([1, 2]));
        assert_eq!(
            data.get("target").and_then(DataValue::as_str),
            Some("http://t/")
        );
        assert_eq!(
            data.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["target", "user", "extra"]
        );
        assert_eq!(
            serde_json::to_value(&data).unwrap(),
            Value::Object(posted.clone())
        );
        assert_eq!(Map::from(data.clone()), posted);
        assert_eq!(data.to_map(), posted);

        assert_eq!(
            data.insert("user".into(), "bob".into()),
            Some("alice".into())
        );
        assert_eq!(data.insert("hub".into(), true.into()), None);
        assert_eq!(
            data.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["target", "user", "extra", "hub"]
        );
        assert_eq!(data.remove("user"), Some("bob".into()));
        assert_eq!(data.remove("user"), None);
        assert_eq!(data.len(), 3);
    }

    #[test]
    fn equality_ignores_order() {
        let a = RouteData::from(map(json!({"target": "x", "user": "u"})));
        let b = RouteData::from(map(json!({"user": "u", "target": "x"})));
        let c = RouteData::from(map(json!({"user": "u", "target": "y"})));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, RouteData::from(map(json!({"target": "x"}))));
    }
}
