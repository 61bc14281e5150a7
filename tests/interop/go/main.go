// Command sigil-interop-go is a SPIFFE workload built on go-spiffe v2. The
// end-to-end tests run it against Sigil's agent, which it finds through
// SPIFFE_ENDPOINT_SOCKET, and read the JSON lines it prints on stdout.
//
// Usage:
//
//	sigil-interop-go fetch   [--timeout S]
//	sigil-interop-go bundles [--timeout S]
//	sigil-interop-go watch   --updates N [--timeout S]
//	sigil-interop-go serve   --addr HOST:PORT [--rounds N] [--timeout S]
//	sigil-interop-go dial    --addr HOST:PORT [--rounds N] [--interval-ms M] [--timeout S]
//	sigil-interop-go redial  --addr HOST:PORT [--interval-ms M] [--duration S]
//
// Every result is one JSON object per line on stdout. Errors go to stderr as
// one line and the exit code is 1 (2 for a usage error). Only the X.509 parts
// of the Workload API are used; nothing here calls the JWT RPCs.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// ioTimeout bounds each handshake and line exchange on a TLS connection.
const ioTimeout = 20 * time.Second

// usageError marks a bad command line (exit code 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	if len(os.Args) < 2 {
		fail(usageError{"usage: sigil-interop-go fetch|bundles|watch|serve|dial|redial [flags]"})
	}
	cmd, args := os.Args[1], os.Args[2:]

	var err error
	switch cmd {
	case "fetch":
		err = runFetch(args)
	case "bundles":
		err = runBundles(args)
	case "watch":
		err = runWatch(args)
	case "serve":
		err = runServe(args)
	case "dial":
		err = runDial(args)
	case "redial":
		err = runRedial(args)
	default:
		err = usageError{fmt.Sprintf("unknown subcommand %q (want fetch, bundles, watch, serve, dial or redial)", cmd)}
	}
	if err != nil {
		fail(err)
	}
}

// fail prints err as one line on stderr and exits.
func fail(err error) {
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	fmt.Fprintf(os.Stderr, "sigil-interop-go: %s\n", msg)
	var ue usageError
	if errors.As(err, &ue) {
		os.Exit(2)
	}
	os.Exit(1)
}

// out serialises writes of JSON lines to stdout.
var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

// emit writes v as one JSON line on stdout. Stdout is unbuffered, so each
// line reaches the reader as soon as it is written.
func emit(v any) {
	out.Lock()
	defer out.Unlock()
	if err := out.enc.Encode(v); err != nil {
		fail(fmt.Errorf("write stdout: %w", err))
	}
}

// newFlags returns a flag set whose errors are reported as usage errors.
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported by fail as one line
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stderr)
			fs.PrintDefaults()
		}
		return usageError{fs.Name() + ": " + err.Error()}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("%s: unexpected arguments %q", fs.Name(), fs.Args())}
	}
	return nil
}

func withTimeout(seconds int) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), time.Duration(seconds)*time.Second)
}

// lastError is a go-spiffe logger that keeps the latest error message, so a
// source that never got its first update can say why.
type lastError struct {
	mu  sync.Mutex
	msg string
}

func (l *lastError) Debugf(string, ...any) {}
func (l *lastError) Infof(string, ...any)  {}
func (l *lastError) Warnf(string, ...any)  {}
func (l *lastError) Errorf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msg = fmt.Sprintf(format, args...)
}

// wrap adds the latest logged error, if any, to err.
func (l *lastError) wrap(err error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.msg == "" {
		return err
	}
	return fmt.Errorf("%w (last error: %s)", err, l.msg)
}

// newSource creates an X509Source, which blocks until the first valid X.509
// context arrives; go-spiffe retries an unreachable agent until ctx ends.
func newSource(ctx context.Context) (*workloadapi.X509Source, error) {
	logs := &lastError{}
	source, err := workloadapi.NewX509Source(ctx,
		workloadapi.WithClientOptions(workloadapi.WithLogger(logs)))
	if err != nil {
		return nil, fmt.Errorf("create X.509 source: %w", logs.wrap(err))
	}
	return source, nil
}

// ---- fetch ----

type svidJSON struct {
	SpiffeID string `json:"spiffe_id"`
	Hint     string `json:"hint"`
	ChainLen int    `json:"chain_len"`
	NotAfter int64  `json:"not_after"`
	Serial   string `json:"serial"`
}

type fetchJSON struct {
	SVIDs   []svidJSON     `json:"svids"`
	Bundles map[string]int `json:"bundles"`
}

type bundlesJSON struct {
	Bundles map[string]int `json:"bundles"`
}

// serialHex renders a serial number as lowercase hex without leading zeros.
func serialHex(c *x509.Certificate) string {
	return c.SerialNumber.Text(16)
}

// countCAs maps each trust domain name to the number of X.509 authorities.
func countCAs(set *x509bundle.Set) map[string]int {
	counts := map[string]int{}
	for _, b := range set.Bundles() {
		counts[b.TrustDomain().Name()] = len(b.X509Authorities())
	}
	return counts
}

func runFetch(args []string) error {
	fs := newFlags("fetch")
	timeout := fs.Int("timeout", 20, "deadline in seconds")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	ctx, cancel := withTimeout(*timeout)
	defer cancel()

	x509Ctx, err := workloadapi.FetchX509Context(ctx)
	if err != nil {
		return fmt.Errorf("fetch X.509 context: %w", err)
	}

	res := fetchJSON{SVIDs: []svidJSON{}, Bundles: countCAs(x509Ctx.Bundles)}
	for _, svid := range x509Ctx.SVIDs {
		// The chain must verify against the bundle of the SVID's trust domain.
		id, _, err := x509svid.Verify(svid.Certificates, x509Ctx.Bundles)
		if err != nil {
			return fmt.Errorf("verify SVID %s: %w", svid.ID, err)
		}
		if id != svid.ID {
			return fmt.Errorf("SVID %s: leaf certificate names %s", svid.ID, id)
		}
		leaf := svid.Certificates[0]
		res.SVIDs = append(res.SVIDs, svidJSON{
			SpiffeID: svid.ID.String(),
			Hint:     svid.Hint,
			ChainLen: len(svid.Certificates),
			NotAfter: leaf.NotAfter.Unix(),
			Serial:   serialHex(leaf),
		})
	}
	emit(res)
	return nil
}

// ---- bundles ----

func runBundles(args []string) error {
	fs := newFlags("bundles")
	timeout := fs.Int("timeout", 20, "deadline in seconds")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	ctx, cancel := withTimeout(*timeout)
	defer cancel()

	set, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		return fmt.Errorf("fetch X.509 bundles: %w", err)
	}
	emit(bundlesJSON{Bundles: countCAs(set)})
	return nil
}

// ---- watch ----

type updateJSON struct {
	SpiffeID   string `json:"spiffe_id"`
	Serial     string `json:"serial"`
	NotBefore  int64  `json:"not_before"`
	NotAfter   int64  `json:"not_after"`
	ReceivedAt int64  `json:"received_at"`
}

// printer is an X509ContextWatcher that prints the default SVID of every
// update and signals done after the wanted number of updates.
type printer struct {
	ctx  context.Context // the watch's context; errors after it ends are expected
	mu   sync.Mutex
	want int
	seen int
	done chan struct{}
}

func (p *printer) OnX509ContextUpdate(c *workloadapi.X509Context) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen >= p.want {
		return
	}
	svid := c.DefaultSVID()
	leaf := svid.Certificates[0]
	emit(updateJSON{
		SpiffeID:   svid.ID.String(),
		Serial:     serialHex(leaf),
		NotBefore:  leaf.NotBefore.Unix(),
		NotAfter:   leaf.NotAfter.Unix(),
		ReceivedAt: now.UnixMilli(),
	})
	p.seen++
	if p.seen == p.want {
		close(p.done)
	}
}

func (p *printer) OnX509ContextWatchError(err error) {
	// Transient: go-spiffe reconnects (or skips a bad message) on its own.
	if err != nil && p.ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "sigil-interop-go: watch: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
	}
}

func runWatch(args []string) error {
	fs := newFlags("watch")
	updates := fs.Int("updates", 1, "exit 0 after this many X.509 context updates")
	timeout := fs.Int("timeout", 120, "give up (exit 1) after this many seconds")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *updates < 1 {
		return usageError{"watch: --updates must be at least 1"}
	}
	ctx, cancel := withTimeout(*timeout)
	defer cancel()

	logs := &lastError{}
	client, err := workloadapi.New(ctx, workloadapi.WithLogger(logs))
	if err != nil {
		return fmt.Errorf("create Workload API client: %w", err)
	}
	defer client.Close()

	// The source blocks until the first valid X.509 context has arrived.
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClient(client))
	if err != nil {
		return fmt.Errorf("create X.509 source: %w", logs.wrap(err))
	}
	defer source.Close()

	// A watch of its own reports every message, starting with the current state.
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	p := &printer{ctx: watchCtx, want: *updates, done: make(chan struct{})}
	watchErr := make(chan error, 1)
	go func() { watchErr <- client.WatchX509Context(watchCtx, p) }()

	select {
	case <-p.done:
		return nil
	case err := <-watchErr:
		if ctx.Err() == nil {
			return fmt.Errorf("watch ended: %w", err)
		}
	case <-ctx.Done():
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return fmt.Errorf("timed out after %ds with %d of %d updates", *timeout, p.seen, *updates)
}

// ---- serve / dial ----

type connJSON struct {
	Peer string `json:"peer"`
	Self string `json:"self"`
	// Set by dialOnce for redial; not printed.
	peerCA string
	selfCA string
}

type roundJSON struct {
	Peer  string `json:"peer"`
	Self  string `json:"self"`
	Round int    `json:"round"`
}

type listeningJSON struct {
	Listening string `json:"listening"`
}

// selfID is the SPIFFE ID of the source's current default SVID.
func selfID(source *workloadapi.X509Source) (spiffeid.ID, error) {
	svid, err := source.GetX509SVID()
	if err != nil {
		return spiffeid.ID{}, err
	}
	return svid.ID, nil
}

func runServe(args []string) error {
	fs := newFlags("serve")
	addr := fs.String("addr", "", "listen address, e.g. 127.0.0.1:0")
	rounds := fs.Int("rounds", 1, "exit 0 after this many successful connections")
	timeout := fs.Int("timeout", 120, "give up (exit 1) after this many seconds")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		return usageError{"serve: --addr is required"}
	}
	if *rounds < 1 {
		return usageError{"serve: --rounds must be at least 1"}
	}
	ctx, cancel := withTimeout(*timeout)
	defer cancel()

	source, err := newSource(ctx)
	if err != nil {
		return err
	}
	defer source.Close()

	ln, err := spiffetls.ListenWithMode(ctx, "tcp", *addr,
		spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeAny(), source))
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *addr, err)
	}
	defer ln.Close()
	// Unblock Accept when the deadline passes.
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	emit(listeningJSON{Listening: ln.Addr().String()})

	for served := 0; served < *rounds; {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("timed out after %ds with %d of %d connections", *timeout, served, *rounds)
			}
			return fmt.Errorf("accept: %w", err)
		}
		res, err := serveConn(conn, source)
		if err != nil {
			// A rejected or broken peer does not count; keep serving.
			fmt.Fprintf(os.Stderr, "sigil-interop-go: serve: connection from %s: %s\n",
				conn.RemoteAddr(), strings.ReplaceAll(err.Error(), "\n", " "))
			continue
		}
		emit(res)
		served++
	}
	return nil
}

// serveConn completes the handshake, reads one line and answers with the
// server's own SPIFFE ID.
func serveConn(conn net.Conn, source *workloadapi.X509Source) (connJSON, error) {
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		return connJSON{}, err
	}
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		return connJSON{}, fmt.Errorf("handshake: %w", err)
	}
	self, err := selfID(source)
	if err != nil {
		return connJSON{}, err
	}
	if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
		return connJSON{}, fmt.Errorf("read request: %w", err)
	}
	if _, err := fmt.Fprintf(conn, "%s\n", self); err != nil {
		return connJSON{}, fmt.Errorf("write reply: %w", err)
	}
	return connJSON{Peer: peer.String(), Self: self.String()}, nil
}

func runDial(args []string) error {
	fs := newFlags("dial")
	addr := fs.String("addr", "", "server address, e.g. 127.0.0.1:8443")
	rounds := fs.Int("rounds", 1, "number of connections, each with a new handshake")
	interval := fs.Int("interval-ms", 0, "pause between rounds in milliseconds")
	timeout := fs.Int("timeout", 120, "give up (exit 1) after this many seconds")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		return usageError{"dial: --addr is required"}
	}
	if *rounds < 1 || *interval < 0 {
		return usageError{"dial: --rounds must be at least 1 and --interval-ms not negative"}
	}
	ctx, cancel := withTimeout(*timeout)
	defer cancel()

	source, err := newSource(ctx)
	if err != nil {
		return err
	}
	defer source.Close()

	for round := 1; round <= *rounds; round++ {
		if round > 1 && *interval > 0 {
			select {
			case <-time.After(time.Duration(*interval) * time.Millisecond):
			case <-ctx.Done():
				return fmt.Errorf("timed out after %ds before round %d", *timeout, round)
			}
		}
		res, err := dialOnce(ctx, *addr, source)
		if err != nil {
			return fmt.Errorf("round %d: %w", round, err)
		}
		emit(roundJSON{Peer: res.Peer, Self: res.Self, Round: round})
	}
	return nil
}

// dialOnce opens a new mTLS connection, sends one line and checks that the
// reply is the server's SPIFFE ID as authenticated in the handshake.
func dialOnce(ctx context.Context, addr string, source *workloadapi.X509Source) (connJSON, error) {
	deadline := time.Now().Add(ioTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn, err := spiffetls.DialWithMode(ctx, "tcp", addr,
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeAny(), source),
		spiffetls.WithDialer(&net.Dialer{Deadline: deadline}))
	if err != nil {
		return connJSON{}, fmt.Errorf("handshake: %w", err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(deadline); err != nil {
		return connJSON{}, err
	}
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		return connJSON{}, fmt.Errorf("handshake: %w", err)
	}
	self, err := selfID(source)
	if err != nil {
		return connJSON{}, err
	}
	if _, err := fmt.Fprintf(conn, "%s\n", self); err != nil {
		return connJSON{}, fmt.Errorf("write request: %w", err)
	}
	// With TLS 1.3 a server that rejects our certificate says so only now.
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return connJSON{}, fmt.Errorf("read reply: %w", err)
	}
	if got := strings.TrimSpace(reply); got != peer.String() {
		return connJSON{}, fmt.Errorf("server replied %q but authenticated as %s", got, peer)
	}
	res := connJSON{Peer: peer.String(), Self: self.String()}
	if leaf := peerLeaf(conn); leaf != nil {
		res.peerCA = signerOf(leaf, source)
	}
	if svid, err := source.GetX509SVID(); err == nil {
		res.selfCA = signerOf(svid.Certificates[0], source)
	}
	return res, nil
}

// ---- redial ----

type redialJSON struct {
	Round int    `json:"round"`
	OK    bool   `json:"ok"`
	At    int64  `json:"at"`
	Peer  string `json:"peer,omitempty"`
	Self  string `json:"self,omitempty"`
	// PeerCA and SelfCA are the SHA-256 (hex) of the DER of the bundle
	// authority that signed the peer's leaf (as presented in the handshake)
	// and this side's leaf (the source's SVID after the handshake).
	PeerCA string `json:"peer_ca,omitempty"`
	SelfCA string `json:"self_ca,omitempty"`
	Error  string `json:"error,omitempty"`
}

type redialSummaryJSON struct {
	Rounds int `json:"rounds"`
	Failed int `json:"failed"`
}

// runRedial opens a new mTLS connection every --interval-ms, as dial does,
// and keeps going after a failure: every round, successful or not, is one
// line. It stops when stdin reaches end of file or after --duration
// seconds, prints a summary line and exits 1 if any round failed.
func runRedial(args []string) error {
	fs := newFlags("redial")
	addr := fs.String("addr", "", "server address, e.g. 127.0.0.1:8443")
	interval := fs.Int("interval-ms", 200, "pause between rounds in milliseconds")
	duration := fs.Int("duration", 600, "stop after this many seconds (or when stdin closes)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		return usageError{"redial: --addr is required"}
	}
	if *interval < 0 || *duration < 1 {
		return usageError{"redial: --interval-ms must not be negative and --duration must be at least 1"}
	}
	ctx, cancel := withTimeout(*duration)
	defer cancel()
	// Stdin closing ends the run after the round in progress.
	stop := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()

	source, err := newSource(ctx)
	if err != nil {
		return err
	}
	defer source.Close()

	summary := redialSummaryJSON{}
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return ctx.Err() != nil
		}
	}
	for round := 1; !stopped(); round++ {
		res := redialJSON{Round: round}
		conn, err := dialOnce(ctx, *addr, source)
		res.At = time.Now().UnixMilli()
		if err != nil {
			if ctx.Err() != nil {
				break // interrupted by --duration, not a failure
			}
			res.Error = err.Error()
			summary.Failed++
		} else {
			res.OK = true
			res.Peer, res.Self = conn.Peer, conn.Self
			res.PeerCA, res.SelfCA = conn.peerCA, conn.selfCA
		}
		summary.Rounds++
		emit(res)
		select {
		case <-time.After(time.Duration(*interval) * time.Millisecond):
		case <-ctx.Done():
		case <-stop:
		}
	}
	emit(map[string]redialSummaryJSON{"summary": summary})
	if summary.Failed > 0 {
		return fmt.Errorf("%d of %d rounds failed", summary.Failed, summary.Rounds)
	}
	return nil
}

// signerOf is the SHA-256 (hex) of the authority of the source's bundle
// for leaf's trust domain that signed leaf, or "" if none did.
func signerOf(leaf *x509.Certificate, source *workloadapi.X509Source) string {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return ""
	}
	bundle, err := source.GetX509BundleForTrustDomain(id.TrustDomain())
	if err != nil {
		return ""
	}
	for _, ca := range bundle.X509Authorities() {
		if leaf.CheckSignatureFrom(ca) == nil {
			sum := sha256.Sum256(ca.Raw)
			return hex.EncodeToString(sum[:])
		}
	}
	return ""
}

// peerLeaf is the leaf certificate the peer of conn presented.
func peerLeaf(conn net.Conn) *x509.Certificate {
	tc, ok := conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return nil
	}
	certs := tc.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil
	}
	return certs[0]
}
