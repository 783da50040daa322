// The reference snapshotter (containerd/stargz-snapshotter 0.12, built from Debian's Go sources) behind a minimal
// gRPC main, for benchmarks side by side with our daemon. Debian packages the reference's libraries but not its
// daemon, and its service package needs k8s.io/cri-api, which Debian does not package; so this main wires the same
// parts the reference's service.NewStargzSnapshotterService does (fs.NewFilesystem with the default-label sources,
// snapshot.NewSnapshotter with asynchronous remove) without the CRI/kubeconfig keychains and mirrors: anonymous
// registries only, plain HTTP for localhost as the reference's resolver does. Build: ./build.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

// hosts is the reference resolver's default for a host without mirrors (retrying client, 30 s request timeout).
func hosts(ref reference.Spec) ([]docker.RegistryHost, error) {
	client := rhttp.NewClient()
	client.Logger = nil
	tr := client.StandardClient()
	tr.Timeout = 30 * time.Second
	h := docker.RegistryHost{
		Client: tr, Host: ref.Hostname(), Scheme: "https", Path: "/v2",
		Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(tr)),
	}
	if local, _ := docker.MatchLocalhost(h.Host); local {
		h.Scheme = "http"
	}
	return []docker.RegistryHost{h}, nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "")
	configPath := flag.String("config", "", "")
	logLevel := flag.String("log-level", "info", "")
	flag.Parse()
	if lvl, err := logrus.ParseLevel(*logLevel); err == nil {
		logrus.SetLevel(lvl)
	}
	var cfg fsconfig.Config
	if *configPath != "" {
		if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
			fail(err)
		}
	}
	ctx := context.Background()
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)), stargzfs.WithOverlayOpaqueType(layer.OverlayOpaqueTrusted))
	if err != nil {
		fail(err)
	}
	rs, err := snbase.NewSnapshotter(ctx, filepath.Join(*root, "snapshotter"), fs, snbase.AsynchronousRemove)
	if err != nil {
		fail(err)
	}
	os.MkdirAll(filepath.Dir(*address), 0700)
	os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		fail(err)
	}
	fmt.Fprintln(os.Stderr, "serving containerd snapshots API on", *address)
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(rs))
	go srv.Serve(l)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	srv.Stop()
	rs.Close()
}
