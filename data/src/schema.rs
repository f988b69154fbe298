//! The two record schemas (`text`; `context` + `question` + `answer`), their
//! up-front validation against a file's Arrow schema, and the conversion of
//! Arrow columns into [`Record`]s with per-row checks.

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema};

use crate::error::{BadInputKind, DataError, Location, Result};

/// Which columns hold what. Column names are configurable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SchemaSpec {
    /// Plain documents; the builder cuts prefix/span/suffix windows.
    Text {
        /// The text column.
        text: String,
    },
    /// Question answering: the context is compressed, question + answer follow.
    Qa {
        /// The context column.
        context: String,
        /// The question column.
        question: String,
        /// The answer column: a string, or a list of strings (the first is used).
        answer: String,
    },
}

impl SchemaSpec {
    /// `text` with the default column name.
    pub fn text() -> Self {
        Self::Text {
            text: "text".into(),
        }
    }

    /// QA with the default column names `context`, `question`, `answer`.
    pub fn qa() -> Self {
        Self::Qa {
            context: "context".into(),
            question: "question".into(),
            answer: "answer".into(),
        }
    }

    /// The columns read, in order.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Self::Text { text } => vec![text],
            Self::Qa {
                context,
                question,
                answer,
            } => vec![context, question, answer],
        }
    }

    /// Checks that `schema` has every column with a usable type; the error
    /// names `file` and the column.
    pub fn validate(&self, file: &str, schema: &Schema) -> Result<()> {
        for (i, col) in self.columns().into_iter().enumerate() {
            let is_answer = matches!(self, Self::Qa { .. }) && i == 2;
            let field = schema.field_with_name(col).map_err(|_| DataError::Schema {
                location: Location {
                    file: file.to_string(),
                    row: None,
                    column: Some(col.to_string()),
                },
                reason: format!(
                    "column missing (the file has: {})",
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
            let ok = is_stringish(field.data_type())
                || (is_answer
                    && match field.data_type() {
                        DataType::List(f) | DataType::LargeList(f) => is_stringish(f.data_type()),
                        _ => false,
                    });
            if !ok {
                return Err(DataError::Schema {
                    location: Location {
                        file: file.to_string(),
                        row: None,
                        column: Some(col.to_string()),
                    },
                    reason: format!(
                        "type {} is not a string{}",
                        field.data_type(),
                        if is_answer { " or list of strings" } else { "" }
                    ),
                });
            }
        }
        Ok(())
    }
}

fn is_stringish(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

/// One row of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A plain document.
    Text {
        /// The document.
        text: String,
    },
    /// A QA row.
    Qa {
        /// The context (compressed).
        context: String,
        /// The question.
        question: String,
        /// The accepted answers; the first is the training target.
        answers: Vec<String>,
    },
}

impl Record {
    /// Total bytes of text in the row.
    pub fn text_bytes(&self) -> usize {
        match self {
            Self::Text { text } => text.len(),
            Self::Qa {
                context,
                question,
                answers,
            } => context.len() + question.len() + answers.iter().map(String::len).sum::<usize>(),
        }
    }
}

/// Bytes of row `i` of a string or binary column (`None` for null).
fn bytes_at(a: &dyn Array, i: usize) -> Option<&[u8]> {
    if a.is_null(i) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(i).as_bytes(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(i).as_bytes(),
        DataType::Utf8View => a.as_string_view().value(i).as_bytes(),
        DataType::Binary => a.as_binary::<i32>().value(i),
        DataType::LargeBinary => a.as_binary::<i64>().value(i),
        DataType::BinaryView => a.as_binary_view().value(i),
        _ => return None,
    })
}

fn bad(loc: Location, kind: BadInputKind, detail: impl Into<String>) -> DataError {
    DataError::BadRow {
        location: loc,
        kind,
        detail: detail.into(),
    }
}

/// A non-empty UTF-8 string from a cell, or the row's error.
fn text_cell(a: &dyn Array, i: usize, loc: impl Fn() -> Location) -> Result<String> {
    let b = bytes_at(a, i).ok_or_else(|| bad(loc(), BadInputKind::Empty, "null"))?;
    let s = std::str::from_utf8(b).map_err(|e| {
        bad(
            loc(),
            BadInputKind::NotUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    if s.trim().is_empty() {
        return Err(bad(loc(), BadInputKind::Empty, "empty text"));
    }
    Ok(s.to_string())
}

/// The answers of a string or list-of-strings cell.
fn answers_cell(a: &dyn Array, i: usize, loc: impl Fn() -> Location) -> Result<Vec<String>> {
    let list: ArrayRef = match a.data_type() {
        DataType::List(_) => {
            if a.is_null(i) {
                return Err(bad(loc(), BadInputKind::Empty, "null answer list"));
            }
            a.as_list::<i32>().value(i)
        }
        DataType::LargeList(_) => {
            if a.is_null(i) {
                return Err(bad(loc(), BadInputKind::Empty, "null answer list"));
            }
            a.as_list::<i64>().value(i)
        }
        _ => return Ok(vec![text_cell(a, i, loc)?]),
    };
    let mut out = Vec::with_capacity(list.len());
    for j in 0..list.len() {
        out.push(text_cell(list.as_ref(), j, &loc)?);
    }
    if out.is_empty() {
        return Err(bad(loc(), BadInputKind::Empty, "empty answer list"));
    }
    Ok(out)
}

/// Converts a batch projected to `spec.columns()` (in that order) into
/// records; `first_row` is the file row of the batch's first row. Each row is
/// its own result, so a bad row can be skipped by policy.
pub fn batch_records(
    spec: &SchemaSpec,
    file: &str,
    first_row: u64,
    batch: &RecordBatch,
) -> Result<Vec<Result<Record>>> {
    let names = spec.columns();
    let mut cols = Vec::with_capacity(names.len());
    for n in &names {
        let c = batch.column_by_name(n).ok_or_else(|| DataError::Schema {
            location: Location {
                file: file.to_string(),
                row: None,
                column: Some(n.to_string()),
            },
            reason: "column missing from the decoded batch".into(),
        })?;
        cols.push(c.clone());
    }
    let loc = |i: usize, c: &str| Location::cell(file, first_row + i as u64, c);
    let rows = (0..batch.num_rows())
        .map(|i| match spec {
            SchemaSpec::Text { text } => Ok(Record::Text {
                text: text_cell(cols[0].as_ref(), i, || loc(i, text))?,
            }),
            SchemaSpec::Qa {
                context,
                question,
                answer,
            } => Ok(Record::Qa {
                context: text_cell(cols[0].as_ref(), i, || loc(i, context))?,
                question: text_cell(cols[1].as_ref(), i, || loc(i, question))?,
                answers: answers_cell(cols[2].as_ref(), i, || loc(i, answer))?,
            }),
        })
        .collect();
    Ok(rows)
}
