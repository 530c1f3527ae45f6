//! Creating and deleting trickle channels over HTTP, as an orchestrator would.
//!
//! On the Livepeer network the orchestrator creates a job's channels; with this project's own
//! server (`serve --autocreate`) a process creates them itself: `POST {url}` with the channel's
//! MIME type in `Expect-Content`, and `DELETE {url}` to close one (its readers end on 404).
//! An `https://` server's certificate is treated as the given [`ClientTls`] says.

use trickle::client_tls::ClientTls;

/// An HTTP client for `url` in mode `tls`.
fn client(url: &str, tls: &ClientTls) -> anyhow::Result<reqwest::Client> {
    tls.builder(url)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot set up an HTTP client: {e}"))
}

/// A request to `url` that got no answer: a refused certificate, or `unreachable`.
fn no_answer(url: &str, tls: &ClientTls, e: &reqwest::Error, unreachable: String) -> anyhow::Error {
    match tls.refusal(e) {
        Some((reason, hint)) => {
            anyhow::anyhow!("TLS certificate of {url} refused: {reason}; {hint}")
        }
        None => anyhow::anyhow!(unreachable),
    }
}

/// Creates the channel at `url` (the server must allow creation over HTTP) with MIME type `mime`.
pub async fn create_channel(url: &str, mime: &str, tls: &ClientTls) -> anyhow::Result<()> {
    let response = client(url, tls)?
        .post(url)
        .header(trickle::headers::EXPECT_CONTENT, mime)
        .send()
        .await
        .map_err(|e| {
            no_answer(
                url,
                tls,
                &e,
                format!(
                "cannot reach {url} to create the channel ({e}); is the trickle server running?"
            ),
            )
        })?;
    if !response.status().is_success() {
        anyhow::bail!(
            "creating channel {url} answered {}; does the server allow channel creation (serve --autocreate)?",
            response.status()
        );
    }
    Ok(())
}

/// Deletes the channel at `url`. A channel already gone (404, or the reference server's 400
/// `Invalid stream`) counts as deleted.
pub async fn delete_channel(url: &str, tls: &ClientTls) -> anyhow::Result<()> {
    let response = client(url, tls)?.delete(url).send().await.map_err(|e| {
        no_answer(
            url,
            tls,
            &e,
            format!("cannot reach {url} to delete the channel ({e})"),
        )
    })?;
    match response.status().as_u16() {
        200..=299 | 400 | 404 => Ok(()),
        status => anyhow::bail!("deleting channel {url} answered HTTP {status}"),
    }
}

/// A new channel name with 128 random bits (32 hex digits), unguessable by other sessions.
pub fn random_name() -> String {
    trickle::server::random_channel_name()
}

/// The URL a channel named `name` has on the server that serves `sibling` (another channel's
/// URL): `http://h:p/base/ctl` and `x` give `http://h:p/base/x`.
pub fn sibling_url(sibling: &str, name: &str) -> String {
    let base = sibling.trim_end_matches('/');
    let base = match base.rfind('/') {
        // Keep `scheme://host` whole when the URL has no path.
        Some(i) if base[..i].ends_with('/') => base,
        Some(i) => &base[..i],
        None => base,
    };
    format!("{base}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_urls_share_the_base_path() {
        assert_eq!(
            sibling_url("http://h:1/ai/trickle/ctl", "x"),
            "http://h:1/ai/trickle/x"
        );
        assert_eq!(sibling_url("http://h:1/ctl/", "x"), "http://h:1/x");
        assert_eq!(sibling_url("http://h:1", "x"), "http://h:1/x");
        assert_eq!(random_name().len(), 32);
        assert_ne!(random_name(), random_name());
    }
}
