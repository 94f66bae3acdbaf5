//! The mail sink and the webhook receiver as pods of the test cluster:
//! mailpit behind Service `mailpit` (SMTP 1025, API 8025) and
//! `herald-test-receiver` behind Service `receiver` (port 80), both from
//! the local images, never pulled, run as the images' non-root user on a
//! read-only root filesystem as Herald's own pods are.
//!
//! The receiver runs one replica: what it recorded lives in that pod, and
//! tests read it through its control API ([`RemoteReceiver`](crate::RemoteReceiver)).

use crate::Images;

/// The receiver's Service name and port: webhooks go to
/// `http://receiver.<namespace>.svc/<path>`.
pub const RECEIVER_SERVICE: &str = "receiver";
/// The mail sink's Service name (Herald's `mail.smtp_host`).
pub const MAILPIT_SERVICE: &str = "mailpit";

/// Deployments and Services of mailpit and the receiver in `namespace`.
pub fn sinks_manifest(images: &Images, namespace: &str) -> String {
    let security = "          securityContext:
            runAsNonRoot: true
            runAsUser: 65532
            runAsGroup: 65532
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities:
              drop: [ALL]
            seccompProfile:
              type: RuntimeDefault";
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {MAILPIT_SERVICE}
  namespace: {namespace}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: {MAILPIT_SERVICE}}}
  template:
    metadata:
      labels: {{app: {MAILPIT_SERVICE}}}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false
      containers:
        - name: mailpit
          image: {mailpit}
          imagePullPolicy: Never
          # Its database in /tmp, an emptyDir.
          args: [--smtp, '0.0.0.0:1025', --listen, '0.0.0.0:8025', --database, /tmp/mailpit.db]
          ports:
            - {{name: smtp, containerPort: 1025}}
            - {{name: http, containerPort: 8025}}
          readinessProbe:
            httpGet: {{path: /api/v1/messages, port: http}}
            periodSeconds: 2
{security}
          volumeMounts:
            - {{name: tmp, mountPath: /tmp}}
      volumes:
        - {{name: tmp, emptyDir: {{sizeLimit: 64Mi}}}}
---
apiVersion: v1
kind: Service
metadata:
  name: {MAILPIT_SERVICE}
  namespace: {namespace}
spec:
  selector: {{app: {MAILPIT_SERVICE}}}
  ports:
    - {{name: smtp, port: 1025, targetPort: smtp}}
    - {{name: http, port: 8025, targetPort: http}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {RECEIVER_SERVICE}
  namespace: {namespace}
spec:
  # One: what it recorded lives in this pod.
  replicas: 1
  selector:
    matchLabels: {{app: {RECEIVER_SERVICE}}}
  template:
    metadata:
      labels: {{app: {RECEIVER_SERVICE}}}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false
      containers:
        - name: receiver
          image: {receiver}
          imagePullPolicy: Never
          args: [--listen, '0.0.0.0:8080']
          ports:
            - {{name: http, containerPort: 8080}}
          readinessProbe:
            httpGet: {{path: /_receiver/healthz, port: http}}
            periodSeconds: 2
{security}
---
apiVersion: v1
kind: Service
metadata:
  name: {RECEIVER_SERVICE}
  namespace: {namespace}
spec:
  selector: {{app: {RECEIVER_SERVICE}}}
  ports:
    - {{name: http, port: 80, targetPort: http}}
",
        mailpit = images.mailpit().reference,
        receiver = images.test_receiver().reference,
    )
}
