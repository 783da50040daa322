// Package conformance holds our daemon to containerd 1.6's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite), spoken through containerd's own proxy client
// (snapshots/proxy) over a gRPC connection to a fresh daemon per test, as containerd's proxy plugin dials it.
//
// Each variant is one run of the whole suite; the variants differ in how the client dials and what it sends:
//
//	containerd   unix://SOCK with containerd's dialer (:authority "localhost"), containerd-namespace header sent
//	passthrough  passthrough:///SOCK (grpc-go sends the socket path as :authority), no containerd-namespace header
//
// TestPlainPathTarget covers the older form of the same client, grpc.Dial(SOCK, WithDialer(...)), whose :authority is
// the path with its leading slash, with a short round of calls rather than the whole suite.
//
// Built in GOPATH mode from Debian's packaged sources by run.sh, which passes -daemon.
package conformance

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var (
	daemonPath = flag.String("daemon", os.Getenv("STARGZ_DAEMON"), "the stargz-snapshotter executable (default $STARGZ_DAEMON)")
	logDir     = flag.String("logdir", "", "where each daemon's log is kept (default: a temp dir, removed)")
	only       = flag.String("variants", "", "comma-separated variants to run (default all)")
)

// readyLine is what the daemon logs once its socket serves the snapshots API.
const readyLine = "serving containerd snapshots API"

type variant struct {
	name string
	// dial connects to sock the way this variant's client does.
	dial func(ctx context.Context, sock string) (*grpc.ClientConn, error)
	// authority is the :authority the client sends for sock (checked before the suite runs).
	authority func(sock string) string
	// header: whether calls carry the containerd-namespace header the suite's contexts set.
	header bool
}

var variants = []variant{
	{
		name: "containerd",
		// As containerd 1.6's proxy plugins (services/server: proxyClients.getClient).
		dial: func(ctx context.Context, sock string) (*grpc.ClientConn, error) {
			bo := backoff.DefaultConfig
			bo.MaxDelay = 3 * time.Second
			return grpc.DialContext(ctx, dialer.DialAddress(sock),
				grpc.WithInsecure(),
				grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo}),
				grpc.WithContextDialer(dialer.ContextDialer),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
				grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)))
		},
		authority: func(string) string { return "localhost" },
		header:    true,
	},
	{
		name: "passthrough",
		dial: func(ctx context.Context, sock string) (*grpc.ClientConn, error) {
			return dialPath(ctx, "passthrough:///"+sock, sock, false)
		},
		// The target is "passthrough:///" + "/abs/path": grpc-go takes the endpoint (everything after the third slash,
		// the absolute path) as the :authority.
		authority: func(sock string) string { return sock },
		header:    false,
	},
}

// plainPath is the old pattern: the socket path as the whole target (no scheme, so grpc-go's default passthrough
// resolver), the path as :authority.
var plainPath = variant{
	name: "plain-path",
	dial: func(ctx context.Context, sock string) (*grpc.ClientConn, error) {
		return dialPath(ctx, sock, sock, true)
	},
	authority: func(sock string) string { return sock },
	header:    true,
}

// dialPath dials target through a dialer that ignores the address and connects to sock; without header, calls go
// without the containerd-namespace header, as from a client that never sets it.
func dialPath(ctx context.Context, target, sock string, header bool) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}),
	}
	if !header {
		opts = append(opts,
			grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(withoutNamespaceHeader(ctx), method, req, reply, cc, opts...)
			}),
			grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(withoutNamespaceHeader(ctx), desc, cc, method, opts...)
			}))
	}
	return grpc.DialContext(ctx, target, opts...)
}

// withoutNamespaceHeader drops the containerd-namespace header that namespaces.WithNamespace puts on the context.
func withoutNamespaceHeader(ctx context.Context) context.Context {
	md, ok := metadata.FromOutgoingContext(ctx)
	if !ok {
		return ctx
	}
	md = md.Copy()
	delete(md, namespaces.GRPCHeader)
	return metadata.NewOutgoingContext(ctx, md)
}

func TestSnapshotterSuite(t *testing.T) {
	exe, logs := setup(t)
	for _, v := range variants {
		v := v
		if *only != "" && !contains(strings.Split(*only, ","), v.name) {
			continue
		}
		t.Run(v.name, func(t *testing.T) {
			// A variant that did not send what it claims would prove nothing: check the client first.
			if err := checkClientSends(v); err != nil {
				t.Fatal(err)
			}
			testsuite.SnapshotterSuite(t, "stargz-"+v.name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				return startSnapshotter(ctx, exe, logs, v, root)
			})
		})
	}
}

// TestPlainPathTarget: a client that dials the bare socket path is served, and a NotFound quotes its key.
func TestPlainPathTarget(t *testing.T) {
	exe, logs := setup(t)
	if err := checkClientSends(plainPath); err != nil {
		t.Fatal(err)
	}
	ctx := namespaces.WithNamespace(context.Background(), "testsuite")
	sn, cleanup, err := startSnapshotter(ctx, exe, logs, plainPath, filepath.Join(t.TempDir(), "root"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := cleanup(); err != nil {
			t.Error(err)
		}
	}()
	mounts, err := sn.Prepare(ctx, "layer-active", "")
	if err != nil || len(mounts) != 1 || mounts[0].Type != "bind" {
		t.Fatalf("Prepare: %v %+v", err, mounts)
	}
	if err := sn.Commit(ctx, "layer", "layer-active"); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if _, err := sn.View(ctx, "view", "layer"); err != nil {
		t.Fatalf("View: %v", err)
	}
	info, err := sn.Stat(ctx, "view")
	if err != nil || info.Kind != snapshots.KindView || info.Parent != "layer" {
		t.Fatalf("Stat view: %v %+v", err, info)
	}
	_, err = sn.Stat(ctx, "missing")
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "snapshot missing does not exist") {
		t.Fatalf("Stat of a missing key: want NotFound quoting the key, got %v", err)
	}
	for _, k := range []string{"view", "layer"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatalf("Remove %s: %v", k, err)
		}
	}
}

// setup checks what every test needs and returns the daemon executable and where daemon logs go.
func setup(t *testing.T) (exe, logs string) {
	if *daemonPath == "" {
		t.Fatal("no daemon: pass -daemon PATH or set STARGZ_DAEMON")
	}
	exe, err := filepath.Abs(*daemonPath)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(exe); err != nil || st.IsDir() {
		t.Fatalf("daemon executable %s: %v", exe, err)
	}
	if os.Getuid() != 0 {
		t.Fatal("the suite mounts overlays: run as root")
	}
	logs = *logDir
	if logs == "" {
		logs = t.TempDir()
	} else if err := os.MkdirAll(logs, 0o755); err != nil {
		t.Fatal(err)
	}
	return exe, logs
}

// startSnapshotter starts a fresh daemon on root (socket beside it, in the suite's temp dir) and returns containerd's
// proxy snapshotter over a connection dialed as the variant dials; cleanup closes the connection and SIGTERMs the daemon.
func startSnapshotter(ctx context.Context, exe, logs string, v variant, root string) (snapshots.Snapshotter, func() error, error) {
	dir := filepath.Dir(root)
	sock := filepath.Join(dir, "d.sock")
	logPath := filepath.Join(logs, v.name+"-"+filepath.Base(dir)+".log")
	d, err := startDaemon(exe, sock, root, logPath)
	if err != nil {
		return nil, nil, err
	}
	if err := probe(sock); err != nil {
		_ = d.stop()
		return nil, nil, fmt.Errorf("daemon on %s serves no call (log %s): %w", sock, logPath, err)
	}
	dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := v.dial(dialCtx, sock)
	if err != nil {
		_ = d.stop()
		return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "stargz")
	cleanup := func() error {
		cerr := conn.Close()
		if err := d.stop(); err != nil {
			return err
		}
		return cerr
	}
	return sn, cleanup, nil
}

// probe makes one call on a connection of its own, waiting as long as it takes (up to 60 s). containerd 1.6's proxy
// plugins allow a connection's HTTP/2 handshake only about a second (no MinConnectTimeout, so the first backoff
// delay) and fail the call when it is missed; the first connection to a daemon that has just started, still compiling
// its first calls on a busy 2-core machine, can take longer. So the suite's connection, which dials as containerd
// does, goes to a daemon that has served a call, as containerd's would in practice.
func probe(sock string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := dialPath(ctx, "passthrough:///"+sock, sock, true)
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = snapshotsapi.NewSnapshotsClient(conn).Stat(ctx,
		&snapshotsapi.StatSnapshotRequest{Snapshotter: "stargz", Key: "stargz-conformance-probe"}, grpc.WaitForReady(true))
	if status.Code(err) != codes.NotFound {
		return fmt.Errorf("Stat of a missing key: want NotFound, got %v", err)
	}
	return nil
}

type daemon struct {
	cmd    *exec.Cmd
	exited chan struct{}
	log    string
	tail   *tailBuffer
}

func startDaemon(exe, sock, root, logPath string) (*daemon, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "--address", sock, "--root", root, "--log-level", "debug")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		logFile.Close()
		return nil, err
	}
	cmd.Stdout = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", exe, err)
	}
	d := &daemon{cmd: cmd, exited: make(chan struct{}), log: logPath, tail: &tailBuffer{max: 40}}
	ready := make(chan struct{})
	go func() {
		// Every stderr line goes to the log file; the ready line unblocks the start.
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(logFile, line)
			d.tail.add(line)
			if strings.Contains(line, readyLine) {
				once.Do(func() { close(ready) })
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
		_ = cmd.Wait()
		logFile.Close()
		close(d.exited)
	}()
	select {
	case <-ready:
		return d, nil
	case <-d.exited:
		return nil, fmt.Errorf("daemon exited before serving (%v); log %s:\n%s", cmd.ProcessState, logPath, d.tail)
	case <-time.After(60 * time.Second):
		_ = d.stop()
		return nil, fmt.Errorf("daemon not serving within 60 s; log %s:\n%s", logPath, d.tail)
	}
}

// stop SIGTERMs the daemon (SIGKILL after 30 s) and reports an unclean exit.
func (d *daemon) stop() error {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("daemon did not stop within 30 s of SIGTERM; log %s:\n%s", d.log, d.tail)
	}
	if !d.cmd.ProcessState.Success() {
		return fmt.Errorf("daemon exited with %v; log %s:\n%s", d.cmd.ProcessState, d.log, d.tail)
	}
	return nil
}

type tailBuffer struct {
	mu    sync.Mutex
	max   int
	lines []string
}

func (b *tailBuffer) add(line string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lines = append(b.lines, line)
	if len(b.lines) > b.max {
		b.lines = b.lines[1:]
	}
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.lines, "\n")
}

// checkClientSends dials a bare HTTP/2 listener the way the variant dials the daemon, makes one call with the suite's
// namespace and reports whether the request's :authority and containerd-namespace header are what the variant says.
func checkClientSends(v variant) error {
	dir, err := os.MkdirTemp("", "stargz-authority-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "c.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	defer l.Close()

	type seen struct {
		authority string
		namespace []string
		err       error
	}
	got := make(chan seen, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- seen{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(c, preface); err != nil || string(preface) != http2.ClientPreface {
			got <- seen{err: fmt.Errorf("no HTTP/2 client preface (%v)", err)}
			return
		}
		fr := http2.NewFramer(c, c)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		if err := fr.WriteSettings(); err != nil {
			got <- seen{err: err}
			return
		}
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				got <- seen{err: err}
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					_ = fr.WriteSettingsAck()
				}
			case *http2.MetaHeadersFrame:
				s := seen{}
				for _, hf := range f.Fields {
					switch hf.Name {
					case ":authority":
						s.authority = hf.Value
					case namespaces.GRPCHeader:
						s.namespace = append(s.namespace, hf.Value)
					}
				}
				got <- s
				return
			}
		}
	}()

	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "testsuite"), 20*time.Second)
	defer cancel()
	conn, err := v.dial(ctx, sock)
	if err != nil {
		return fmt.Errorf("%s: dial: %w", v.name, err)
	}
	defer conn.Close()
	go func() {
		_, _ = snapshotsapi.NewSnapshotsClient(conn).Stat(ctx, &snapshotsapi.StatSnapshotRequest{Snapshotter: "stargz", Key: "k"})
	}()
	var s seen
	select {
	case s = <-got:
	case <-ctx.Done():
		return fmt.Errorf("%s: no request reached the listener", v.name)
	}
	if s.err != nil {
		return fmt.Errorf("%s: reading the request: %w", v.name, s.err)
	}
	if want := v.authority(sock); s.authority != want {
		return fmt.Errorf("%s: client sent :authority %q, want %q", v.name, s.authority, want)
	}
	if v.header && (len(s.namespace) != 1 || s.namespace[0] != "testsuite") {
		return fmt.Errorf("%s: client sent containerd-namespace %q, want [testsuite]", v.name, s.namespace)
	}
	if !v.header && len(s.namespace) != 0 {
		return fmt.Errorf("%s: client sent containerd-namespace %q, want none", v.name, s.namespace)
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if strings.TrimSpace(x) == s {
			return true
		}
	}
	return false
}
