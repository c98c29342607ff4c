//! Input rules for ids, quantities and the purchase an event carries, so
//! every RPC rejects the same things with the same words.

use sagamesh_proto::v1::PurchaseDetails;

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
    #[error("total_price {total} is not unit_price {unit} times quantity {quantity}")]
    PriceMismatch { total: u64, unit: u64, quantity: u32 },
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

/// Checks the purchase a saga event carries: the ids and quantity that
/// `Purchase` accepts, and a total that is the unit price times the
/// quantity.
pub fn validate_purchase(purchase: &PurchaseDetails) -> Result<(), InputError> {
    validate_id("user_id", &purchase.user_id)?;
    validate_id("item_id", &purchase.item_id)?;
    validate_quantity(purchase.quantity)?;
    let (unit, quantity, total) = (purchase.unit_price, purchase.quantity, purchase.total_price);
    if unit.checked_mul(u64::from(quantity)) != Some(total) {
        return Err(InputError::PriceMismatch {
            total,
            unit,
            quantity,
        });
    }
    Ok(())
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

    #[test]
    fn a_purchase_needs_its_ids_a_quantity_and_a_consistent_total() {
        let purchase = PurchaseDetails {
            user_id: "user-1".to_owned(),
            item_id: "item-1".to_owned(),
            quantity: 3,
            unit_price: 100,
            total_price: 300,
            ..PurchaseDetails::default()
        };
        assert_eq!(validate_purchase(&purchase), Ok(()));
        let free = PurchaseDetails {
            total_price: 0,
            ..purchase.clone()
        };
        assert_eq!(
            validate_purchase(&free),
            Err(InputError::PriceMismatch {
                total: 0,
                unit: 100,
                quantity: 3
            })
        );
        let overflowing = PurchaseDetails {
            unit_price: u64::MAX,
            ..purchase.clone()
        };
        assert!(matches!(
            validate_purchase(&overflowing),
            Err(InputError::PriceMismatch { .. })
        ));
        let nothing = PurchaseDetails {
            quantity: 0,
            total_price: 0,
            ..purchase.clone()
        };
        assert_eq!(validate_purchase(&nothing), Err(InputError::ZeroQuantity));
        let nobody = PurchaseDetails {
            user_id: String::new(),
            ..purchase
        };
        assert_eq!(
            validate_purchase(&nobody),
            Err(InputError::Empty { field: "user_id" })
        );
    }
}
