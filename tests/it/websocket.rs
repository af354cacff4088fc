//! Websocket upgrades through hubgate to an in-process echo peer.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    connect_async,
    tungstenite::{self, Message},
    MaybeTlsStream, WebSocketStream,
};

use crate::support::{dead_port, eventually, Hubgate, WsEvent, WsPeer, WAIT, WS_CLOSE_PLEASE};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(hg: &Hubgate, path: &str) -> Result<Ws, Box<tungstenite::Error>> {
    let url = format!("ws://{}{path}", hg.proxy);
    match tokio::time::timeout(WAIT, connect_async(url)).await {
        Ok(result) => result.map(|(ws, _)| ws).map_err(Box::new),
        Err(_) => panic!("websocket handshake to {path}: no answer within {WAIT:?}"),
    }
}

/// The status of the HTTP answer that refused a handshake to `path`.
async fn refused_status(hg: &Hubgate, path: &str) -> u16 {
    match connect(hg, path).await {
        Ok(_) => panic!("handshake to {path} succeeded"),
        Err(e) => match *e {
            tungstenite::Error::Http(resp) => resp.status().as_u16(),
            other => panic!("handshake to {path}: expected an HTTP answer, got {other:?}"),
        },
    }
}

/// The next data message from `ws`, failing the test after `WAIT`.
async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no websocket message within {WAIT:?}"))
            .expect("websocket ended")
            .expect("websocket error");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

/// Start an echo peer and a hubgate with the route `/ws` to it.
async fn setup() -> (WsPeer, Hubgate) {
    let peer = WsPeer::start().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/ws", &format!("http://{}", peer.addr)).await;
    (peer, hg)
}

async fn expect_opened(peer: &WsPeer) -> (String, http::HeaderMap) {
    match peer.next_event().await {
        WsEvent::Opened { path, headers } => (path, headers),
        WsEvent::Closed => panic!("peer saw a connection close before any handshake"),
    }
}

#[tokio::test]
async fn websocket_echoes_text_and_binary() {
    let (peer, hg) = setup().await;
    let mut ws = connect(&hg, "/ws/echo?x=1").await.expect("handshake");

    let (path, headers) = expect_opened(&peer).await;
    assert_eq!(path, "/ws/echo?x=1");
    let proto = headers
        .get("x-forwarded-proto")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        proto.as_deref(),
        Some("ws"),
        "headers at the peer: {headers:?}"
    );
    let forwarded_for = headers
        .get("x-forwarded-for")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(forwarded_for.as_deref(), Some("127.0.0.1"));

    ws.send(Message::Text("hello through hubgate".into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::Text("hello through hubgate".into())
    );
    let binary = vec![0u8, 1, 2, 254, 255];
    ws.send(Message::Binary(binary.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::Binary(binary));

    // A larger message, spread over many TCP segments.
    let big = "w".repeat(256 * 1024);
    ws.send(Message::Text(big.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::Text(big));
}

#[tokio::test]
async fn websocket_traffic_moves_last_activity() {
    let (_peer, hg) = setup().await;
    let ws = connect(&hg, "/ws/activity").await.expect("handshake");
    let before = hg.last_activity("/ws").await;

    let hg = &hg;
    let ws = &tokio::sync::Mutex::new(ws);
    eventually(WAIT, "last_activity of /ws to move", || async move {
        let mut ws = ws.lock().await;
        ws.send(Message::Text("tick".into())).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::Text("tick".into()));
        hg.last_activity("/ws").await > before
    })
    .await;
}

#[tokio::test]
async fn websocket_to_a_down_target_is_503() {
    let hg = Hubgate::start(&[]).await;
    let dead = dead_port();
    hg.add_route("/ws", &dead.url()).await;
    assert_eq!(refused_status(&hg, "/ws/x").await, 503);
    assert!(hg.get("/_chp_healthz").await.status.is_success());
}

#[tokio::test]
async fn websocket_without_a_route_is_404() {
    let hg = Hubgate::start(&[]).await;
    assert_eq!(refused_status(&hg, "/nowhere").await, 404);
}

#[tokio::test]
async fn websocket_close_from_the_client_reaches_the_backend() {
    let (peer, hg) = setup().await;
    let mut ws = connect(&hg, "/ws/close").await.expect("handshake");
    expect_opened(&peer).await;
    ws.send(Message::Text("before close".into())).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::Text("before close".into())
    );

    ws.close(None).await.unwrap();
    match peer.next_event().await {
        WsEvent::Closed => {}
        other => panic!("expected the peer's connection to close, got {other:?}"),
    }
}

#[tokio::test]
async fn websocket_close_from_the_backend_reaches_the_client() {
    let (peer, hg) = setup().await;
    let mut ws = connect(&hg, "/ws/close").await.expect("handshake");
    expect_opened(&peer).await;
    ws.send(Message::Text(WS_CLOSE_PLEASE.into()))
        .await
        .unwrap();

    // The client sees a close frame and then the end of the connection, and no other message.
    // Polling on after the close frame sends the client's reply, completing the handshake.
    let ended = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return Ok(()),
                Some(Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(other)) => return Err(format!("unexpected message {other:?}")),
            }
        }
    };
    tokio::time::timeout(WAIT, ended)
        .await
        .unwrap_or_else(|_| panic!("the client saw no close within {WAIT:?}"))
        .unwrap();
    match peer.next_event().await {
        WsEvent::Closed => {}
        other => panic!("expected the peer's connection to end, got {other:?}"),
    }
}
