//! The identity of one streaming session, shared by its runner and its client.

/// Session and connection ids of one session.
///
/// The runner stamps them on every envelope it builds; the client accepts telemetry only when the
/// ids it carries are these (an envelope without them speaks for nobody and is accepted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionIds {
    /// The session id (`data.session_id` of an envelope).
    pub session_id: Option<String>,
    /// The connection id (`data.connection_id` of an envelope).
    pub connection_id: Option<String>,
}

impl SessionIds {
    /// Fresh random ids, as a client makes them for a new session.
    pub fn generate() -> SessionIds {
        SessionIds {
            session_id: Some(uuid::Uuid::new_v4().to_string()),
            connection_id: Some(uuid::Uuid::new_v4().to_string()),
        }
    }

    /// Whether an envelope carrying these ids may speak for this session.
    ///
    /// An id the envelope does not carry is not a claim; an id this side does not know accepts any.
    pub fn admits(&self, session_id: Option<&str>, connection_id: Option<&str>) -> bool {
        fn matches(ours: &Option<String>, theirs: Option<&str>) -> bool {
            match (ours, theirs) {
                (Some(o), Some(t)) => o == t,
                _ => true,
            }
        }
        matches(&self.session_id, session_id) && matches(&self.connection_id, connection_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_its_own_session() {
        let ids = SessionIds {
            session_id: Some("s1".into()),
            connection_id: Some("c1".into()),
        };
        assert!(ids.admits(Some("s1"), Some("c1")));
        assert!(ids.admits(None, None));
        assert!(ids.admits(Some("s1"), None));
        assert!(!ids.admits(Some("s2"), Some("c1")));
        assert!(!ids.admits(Some("s1"), Some("c2")));
        assert!(SessionIds::default().admits(Some("any"), Some("any")));
    }
}
