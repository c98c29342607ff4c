//! Input rules for ids and quantities, so every RPC rejects the same things
//! with the same words.

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Most items one purchase may buy.
pub const MAX_QUANTITY: u32 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong { field: &'static str, len: usize },
    #[error("{field} may hold only printable characters without spaces")]
    NotPrintable { field: &'static str },
    #[error("quantity must be at least 1")]
    ZeroQuantity,
    #[error("quantity {0} is more than the limit of {MAX_QUANTITY} per purchase")]
    QuantityTooLarge(u32),
}

/// Checks that an id is non-empty, bounded and printable.
pub fn validate_id(field: &'static str, value: &str) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty { field });
    }
    if value.len() > MAX_ID_LEN {
        return Err(InputError::TooLong {
            field,
            len: value.len(),
        });
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(InputError::NotPrintable { field });
    }
    Ok(())
}

/// Checks that a purchase quantity is between 1 and `MAX_QUANTITY`.
pub fn validate_quantity(quantity: u32) -> Result<(), InputError> {
    match quantity {
        0 => Err(InputError::ZeroQuantity),
        q if q > MAX_QUANTITY => Err(InputError::QuantityTooLarge(q)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("user_id", "user-123").is_ok());
        assert_eq!(
            validate_id("user_id", ""),
            Err(InputError::Empty { field: "user_id" })
        );
        assert!(matches!(
            validate_id("user_id", &"x".repeat(129)),
            Err(InputError::TooLong { len: 129, .. })
        ));
        assert!(validate_id("user_id", "a b").is_err());
        assert!(validate_id("user_id", "a\u{7}").is_err());
    }

    #[test]
    fn quantities_are_checked() {
        assert_eq!(validate_quantity(0), Err(InputError::ZeroQuantity));
        assert!(validate_quantity(1).is_ok());
        assert_eq!(validate_quantity(1_001), Err(InputError::QuantityTooLarge(1_001)));
    }
}
