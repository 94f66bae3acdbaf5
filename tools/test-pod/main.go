// Command pod is everything a test cluster runs in its pods:
//
//	pod                 pause: the sandbox process, waits for SIGTERM
//	pod serve ADDR TEXT HTTP on ADDR, answers every request with TEXT
//	pod get URL         GETs URL (10 s deadline), prints the body, exits 0 on 200
//	pod dial ADDR       opens a TCP connection to ADDR (5 s deadline), exits 0 if it opens
//
// get and dial write what happened to /dev/termination-log too, so a test
// reads the outcome from the pod's status without streaming its logs.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		pause()
		return
	}
	switch command, args := os.Args[1], os.Args[2:]; {
	case command == "serve" && len(args) == 2:
		serve(args[0], args[1])
	case command == "get" && len(args) == 1:
		get(args[0])
	case command == "dial" && len(args) == 1:
		dial(args[0])
	default:
		fmt.Fprintln(os.Stderr, "usage: pod | pod serve ADDR TEXT | pod get URL | pod dial ADDR")
		os.Exit(2)
	}
}

func pause() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}

func serve(addr, text string) {
	handler := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, text)
	})
	server := &http.Server{Addr: addr, Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		<-signals
		server.Shutdown(context.Background())
	}()
	if err := server.ListenAndServe(); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func get(url string) {
	client := http.Client{Timeout: 10 * time.Second}
	response, err := client.Get(url)
	if err != nil {
		report(1, "get %s: %v", url, err)
	}
	defer response.Body.Close()
	body, err := io.ReadAll(io.LimitReader(response.Body, 4096))
	if err != nil {
		report(1, "get %s: reading the body: %v", url, err)
	}
	if response.StatusCode != http.StatusOK {
		report(1, "get %s: %s: %s", url, response.Status, body)
	}
	report(0, "%s", body)
}

func dial(addr string) {
	started := time.Now()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	took := time.Since(started).Round(time.Millisecond)
	if err != nil {
		report(1, "dial %s failed after %s: %v", addr, took, err)
	}
	conn.Close()
	report(0, "dial %s connected after %s", addr, took)
}

// report prints the outcome, leaves it in the termination log and exits.
func report(code int, format string, args ...any) {
	message := fmt.Sprintf(format, args...)
	fmt.Println(message)
	os.WriteFile("/dev/termination-log", []byte(message), 0o644)
	os.Exit(code)
}
