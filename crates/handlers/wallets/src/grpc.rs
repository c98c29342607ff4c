//! `sagamesh.v1.Wallets`: create and read users.

use sagamesh_proto::v1::wallets_server::{Wallets as WalletsApi, WalletsServer};
use sagamesh_proto::v1::{CreateUserRequest, GetUserRequest, User};
use tonic::{Request, Response, Status};

use crate::{WalletError, Wallets};

/// Largest balance accepted, so sums stay within SQLite's integers.
const MAX_BALANCE: u64 = i64::MAX as u64 / 2;

pub struct WalletsService {
    wallets: Wallets,
}

impl WalletsService {
    pub fn new(wallets: Wallets) -> WalletsServer<WalletsService> {
        WalletsServer::new(WalletsService { wallets })
    }
}

#[tonic::async_trait]
impl WalletsApi for WalletsService {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let CreateUserRequest { user_id, balance } = request.into_inner();
        sagamesh_saga::validate_id("user_id", &user_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if balance > MAX_BALANCE {
            return Err(Status::invalid_argument(format!(
                "balance {balance} is more than the limit of {MAX_BALANCE}"
            )));
        }
        self.wallets.create_user(user_id.clone(), balance).await?;
        Ok(Response::new(User { user_id, balance }))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let user_id = request.into_inner().user_id;
        sagamesh_saga::validate_id("user_id", &user_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let balance = self.wallets.balance(user_id.clone()).await?;
        Ok(Response::new(User { user_id, balance }))
    }
}

impl From<WalletError> for Status {
    fn from(e: WalletError) -> Status {
        match e {
            WalletError::UserExists(_) => Status::already_exists(e.to_string()),
            WalletError::NoSuchUser(_) => Status::not_found(e.to_string()),
            WalletError::Store(e) => {
                tracing::error!(error = %e, "wallets store failed");
                Status::unavailable("the wallets store is unavailable; try again")
            }
        }
    }
}
