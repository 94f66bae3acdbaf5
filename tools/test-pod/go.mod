// The one program in the test clusters' local image (scripts/install-node.sh
// builds it into an OCI archive): the pod sandbox's pause process, and the
// small HTTP server and client the cluster tests run in pods. The standard
// library only, so the build needs nothing from the module proxy.
module herald/tools/test-pod

go 1.26.0
