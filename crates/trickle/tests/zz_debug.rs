use bytes::Bytes;
use std::time::Duration;
use trickle::publisher::*;
use trickle::server::*;

async fn next(url: &str) -> String { reqwest::get(format!("{url}/next")).await.unwrap().text().await.unwrap() }

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbg() {
    let _ = tracing_subscriber::fmt().with_env_filter("trickle=trace,hyper=trace,reqwest=trace").with_test_writer().try_init();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), ServerConfig { autocreate: true, ..Default::default() }).await.unwrap();
    server.channels().create("s", None).unwrap();
    let url = format!("{}/s", server.url());
    let mut p = Publisher::new(&url, PublisherOptions::default());
    let mut s0 = p.next_segment().await.unwrap();
    s0.write(Bytes::from_static(b"zero")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("after s0 write: next={}", next(&url).await);
    let mut s1 = p.next_segment().await.unwrap();
    s1.write(Bytes::from_static(b"one")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("after s1 write (s0 open): next={}", next(&url).await);
    s0.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("after s0 close: next={}", next(&url).await);
    s1.close().await.unwrap();
}
