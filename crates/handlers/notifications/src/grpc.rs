//! `sagamesh.v1.Notifications`: what was sent to a user.

use sagamesh_proto::v1::notifications_server::{Notifications as NotificationsApi, NotificationsServer};
use sagamesh_proto::v1::{ListNotificationsRequest, ListNotificationsResponse};
use tonic::{Request, Response, Status};

use crate::Notifications;

pub struct NotificationsService {
    notifications: Notifications,
}

impl NotificationsService {
    pub fn new(notifications: Notifications) -> NotificationsServer<NotificationsService> {
        NotificationsServer::new(NotificationsService { notifications })
    }
}

#[tonic::async_trait]
impl NotificationsApi for NotificationsService {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let user_id = request.into_inner().user_id;
        sagamesh_saga::validate_id("user_id", &user_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let notifications = self.notifications.list(user_id).await.map_err(|e| {
            tracing::error!(error = %e, "notifications store failed");
            Status::unavailable("the notifications store is unavailable; try again")
        })?;
        Ok(Response::new(ListNotificationsResponse { notifications }))
    }
}
