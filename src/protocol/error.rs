//! Pusher error codes (protocol 7, "Error Codes") and the close codes that carry them.
//!
//! 4000-4099: do not reconnect unchanged; 4100-4199: reconnect with backoff; 4200-4299:
//! reconnect at once; 4300-4399: other errors (pusher-js `getCloseAction`).

/// A Pusher-level error: sent as `pusher:error`, and, when fatal, also as the close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PusherError {
    #[error("Application does not exist")]
    AppNotFound,
    /// The app was removed from the configuration (live reload).
    #[error("Application disabled")]
    AppDisabled,
    #[error("Application is over connection quota")]
    OverQuota,
    #[error("Path not found")]
    PathNotFound,
    #[error("Invalid version string format")]
    InvalidVersion,
    #[error("Unsupported protocol version")]
    UnsupportedProtocol,
    #[error("No protocol version supplied")]
    NoProtocol,
    #[error("Connection is unauthorized")]
    Unauthorized,
    #[error("Origin not allowed")]
    OriginNotAllowed,
    #[error("Rate limit exceeded")]
    RateLimited,
    #[error("Over capacity")]
    OverCapacity,
    #[error("Pong reply not received")]
    PongTimeout,
    #[error("Server is restarting; reconnect")]
    Restarting,
    #[error("Invalid message format")]
    InvalidMessage,
    #[error("Client event rejected")]
    ClientEventRejected,
}

impl PusherError {
    /// The code in `pusher:error` and, for fatal errors, in the WebSocket close frame.
    pub fn code(self) -> u16 {
        match self {
            PusherError::AppNotFound => 4001,
            PusherError::AppDisabled => 4003,
            PusherError::OverQuota => 4004,
            PusherError::PathNotFound => 4005,
            PusherError::InvalidVersion => 4006,
            PusherError::UnsupportedProtocol => 4007,
            PusherError::NoProtocol => 4008,
            PusherError::Unauthorized | PusherError::OriginNotAllowed => 4009,
            PusherError::RateLimited => 4301,
            PusherError::OverCapacity => 4100,
            PusherError::PongTimeout => 4201,
            // 4200: pusher-js reconnects at once; the drain spreads these closes over a window.
            PusherError::Restarting => 4200,
            // Reverb answers garbled frames with 4200 "Invalid message format" and keeps the
            // connection; we match it so dashboards keyed on codes read the same.
            PusherError::InvalidMessage => 4200,
            PusherError::ClientEventRejected => 4301,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_fall_in_their_ranges() {
        assert_eq!(PusherError::AppNotFound.code(), 4001);
        assert_eq!(PusherError::OverCapacity.code(), 4100);
        assert_eq!(PusherError::PongTimeout.code(), 4201);
        assert_eq!(PusherError::NoProtocol.code(), 4008);
    }
}
