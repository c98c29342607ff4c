//! The values statements take and rows hold: the few types the services'
//! schemas use, the same on every engine.

use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::StoreError;

/// A statement parameter or a column of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        }
    }

    pub(crate) fn from_sqlite(value: ValueRef<'_>) -> Result<Value, StoreError> {
        Ok(match value {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
            ValueRef::Real(_) => return Err(StoreError::Sql("a REAL column; the stores use none".into())),
        })
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

macro_rules! from_integer {
    ($($t:ty),*) => {
        $(impl From<$t> for Value {
            fn from(value: $t) -> Value {
                Value::Int(value as i64)
            }
        })*
    };
}

from_integer!(i64, i32, u32, u64, usize);

impl From<bool> for Value {
    fn from(value: bool) -> Value {
        Value::Int(i64::from(value))
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Value {
        Value::Text(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Value {
        Value::Text(value)
    }
}

impl From<&String> for Value {
    fn from(value: &String) -> Value {
        Value::Text(value.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Value {
        Value::Blob(value)
    }
}

impl From<&[u8]> for Value {
    fn from(value: &[u8]) -> Value {
        Value::Blob(value.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Value {
        value.map_or(Value::Null, Into::into)
    }
}

/// One row of a query's result.
#[derive(Debug, Clone)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    pub(crate) fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    fn column(&self, column: usize) -> Result<&Value, StoreError> {
        self.values
            .get(column)
            .ok_or_else(|| StoreError::Sql(format!("the query has no column {column}")))
    }

    fn mismatch(&self, column: usize, expected: &'static str) -> StoreError {
        StoreError::Column {
            column,
            expected,
            found: self.values.get(column).map_or("nothing", Value::kind),
        }
    }

    pub fn int(&self, column: usize) -> Result<i64, StoreError> {
        match self.column(column)? {
            Value::Int(i) => Ok(*i),
            _ => Err(self.mismatch(column, "an integer")),
        }
    }

    pub fn opt_int(&self, column: usize) -> Result<Option<i64>, StoreError> {
        match self.column(column)? {
            Value::Null => Ok(None),
            _ => self.int(column).map(Some),
        }
    }

    pub fn string(&self, column: usize) -> Result<String, StoreError> {
        match self.column(column)? {
            Value::Text(t) => Ok(t.clone()),
            _ => Err(self.mismatch(column, "text")),
        }
    }

    pub fn opt_string(&self, column: usize) -> Result<Option<String>, StoreError> {
        match self.column(column)? {
            Value::Null => Ok(None),
            _ => self.string(column).map(Some),
        }
    }

    pub fn blob(&self, column: usize) -> Result<&[u8], StoreError> {
        match self.column(column)? {
            Value::Blob(b) => Ok(b),
            _ => Err(self.mismatch(column, "bytes")),
        }
    }
}
