//! The testkit's servers do what the other tests rely on.

use std::time::Duration;

use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor, message::header::ContentType,
};

const DEADLINE: Duration = Duration::from_secs(30);

async fn accepts_connections(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

#[tokio::test]
async fn nats_server_stops_and_starts_again_on_the_same_port() {
    let mut nats = NatsServer::start().await;
    assert!(accepts_connections(nats.port()).await);
    nats.stop().await;
    assert!(!accepts_connections(nats.port()).await);
    nats.start_again().await;
    assert!(accepts_connections(nats.port()).await);
}

#[tokio::test]
async fn mailpit_receives_what_is_sent_over_smtp() {
    let mail = Mailpit::start().await;
    assert!(mail.messages().await.is_empty());
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(mail.smtp_port())
        .build();
    let message = Message::builder()
        .from("herald@example.com".parse().unwrap())
        .to("someone@example.com".parse().unwrap())
        .subject("hello")
        .header(ContentType::TEXT_PLAIN)
        .body("the body".to_string())
        .unwrap();
    transport.send(message).await.unwrap();
    let messages = mail
        .wait_for_messages("someone@example.com", 1, DEADLINE)
        .await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].subject, "hello");
    assert_eq!(messages[0].text.trim(), "the body");
}

#[tokio::test]
async fn the_receiver_fails_first_per_webhook_id_then_accepts() {
    let receiver = TestReceiver::start(ReceiverBehaviour::FailFirst {
        times: 2,
        status: 503,
    })
    .await;
    let http = herald_testkit::http_client();
    let post = |id: &'static str| {
        http.post(receiver.url("/in"))
            .header("webhook-id", id)
            .body("{}")
            .send()
    };
    let mut statuses = Vec::new();
    for id in ["a", "a", "b", "a", "b", "b"] {
        statuses.push(post(id).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [503, 503, 503, 200, 503, 200]);
    let received = receiver.wait_for(6, DEADLINE).await;
    assert_eq!(received[0].path, "/in");
    assert_eq!(received[0].headers["webhook-id"], "a");
    assert_eq!(received[0].body, "{}");
}

#[tokio::test]
#[should_panic(expected = "timed out after 50ms waiting for the impossible")]
async fn wait_until_gives_up_at_the_deadline() {
    wait_until("the impossible", Duration::from_millis(50), || async {
        None::<()>
    })
    .await;
}

#[tokio::test]
async fn the_receivers_control_api_reads_what_it_recorded_and_changes_its_answers() {
    let receiver = TestReceiver::start_with_control("127.0.0.1:0", ReceiverBehaviour::Ok).await;
    let remote = herald_testkit::RemoteReceiver::new(&receiver.url(""));
    assert!(remote.is_up().await);
    let http = herald_testkit::http_client();
    // The wire format docs/images.md promises.
    let told = http
        .put(receiver.url("/_receiver/behaviour"))
        .header("content-type", "application/json")
        .body(r#"{"fail_first": {"times": 1, "status": 500}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(told.status(), 204);
    let post = |id: &'static str| {
        http.post(receiver.url("/in"))
            .header("webhook-id", id)
            .body("{}")
            .send()
    };
    assert_eq!(post("msg_1").await.unwrap().status(), 500);
    assert_eq!(post("msg_1").await.unwrap().status(), 200);
    remote.set_behaviour(&ReceiverBehaviour::Gone).await;
    assert_eq!(post("msg_2").await.unwrap().status(), 410);
    let received = remote.wait_for(3, DEADLINE).await;
    assert_eq!(received.len(), 3, "control requests are not recorded");
    assert_eq!(received[2].headers["webhook-id"], "msg_2");
    let refused = http
        .put(receiver.url("/_receiver/behaviour"))
        .header("content-type", "application/json")
        .body(r#"{"sometimes": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422, "an unknown behaviour is refused");
}
