<?php

/**
 * Agent down, stalled or overloaded: the request still succeeds, unchanged, and the listener's
 * own work at shutdown stays fast. Both transports: the sockets extension, and the streams
 * fallback (`php -n` loads no extension, so no sockets).
 */

declare(strict_types=1);

require __DIR__ . '/lib.php';

/**
 * The app prints its body, then measures from its last shutdown function (which runs just before
 * the listener's, registered later) to a destructor (which runs after every shutdown function):
 * that span is the listener's send. It goes to the file named by $TIMING.
 */
const TIMED_APP = <<<'PHP'
    <?php
    final class Probe {
        public static int $t0 = 0;
        public function __destruct() { file_put_contents(getenv('TIMING'), (string) (hrtime(true) - self::$t0)); }
    }
    $probe = new Probe();
    register_shutdown_function(static function () { Probe::$t0 = hrtime(true); });
    echo str_repeat('r', (int) getenv('BODY'));
    \Bitville\Apm\Listener::tag('pad', str_repeat('p', (int) getenv('PAD')));
    PHP;

/** Runs the timed app; asserts the response is unchanged; returns the listener's time in ms. */
function timed(string $dir, array $env, array $phpArgs, int $pad = 0): float
{
    $timing = $dir . '/timing';
    @unlink($timing);
    $r = run_php($dir, TIMED_APP, $env + ['TIMING' => $timing, 'BODY' => '100', 'PAD' => (string) $pad], $phpArgs);
    same(0, $r->exit, 'exit code');
    same('', $r->stderr, 'stderr (nothing printed, no warning)');
    same(str_repeat('r', 100), $r->stdout, 'response body');
    check(is_file($timing), 'the probe ran after the listener');
    $ms = (int) file_get_contents($timing) / 1e6;
    printf("#   listener shutdown work: %.3f ms\n", $ms);
    return $ms;
}

// Generous (a loaded CI machine can deschedule the worker for tens of ms): the sends take tens
// of µs; only a wait (a blocking connect or write, or PHP's
// default_socket_timeout of 60 s) could get near it.
const FAST_MS = 100.0;

foreach (['sockets' => [], 'streams' => ['-n']] as $transport => $phpArgs) {
    $dir = tmpdir();

    test("[$transport] no agent (no socket files): the request succeeds and the send is fast", function () use ($dir, $phpArgs): void {
        $env = ['APM_SOCKET' => "$dir/missing.sock", 'APM_STREAM_SOCKET' => "$dir/missing-stream.sock", 'APM_RUNTIME_DIR' => $dir];
        $ms = timed($dir, $env, $phpArgs);
        check($ms < FAST_MS, "datagram to a missing socket took $ms ms");
        $ms = timed($dir, $env + ['APM_MAX_DATAGRAM' => '1024'], $phpArgs, 4096);
        check($ms < FAST_MS, "frame to a missing stream socket took $ms ms");
    });

    test("[$transport] stale socket files (agent crashed): connection refused, fast", function () use ($dir, $phpArgs): void {
        $agent = new FakeAgent($dir);
        socket_close($agent->dgram);
        socket_close($agent->stream);
        check(file_exists($agent->dgramPath), 'the stale socket file stays');
        $ms = timed($dir, $agent->env(), $phpArgs);
        check($ms < FAST_MS, "datagram took $ms ms");
        $ms = timed($dir, $agent->env(['APM_MAX_DATAGRAM' => '1024']), $phpArgs, 4096);
        check($ms < FAST_MS, "frame took $ms ms");
        unlink($agent->dgramPath);
        unlink($agent->streamPath);
    });

    test("[$transport] agent stalled with a full datagram queue: dropped, fast", function () use ($dir, $phpArgs): void {
        $agent = new FakeAgent($dir);
        $s = socket_create(AF_UNIX, SOCK_DGRAM, 0);
        $queued = 0;
        while ($queued < 10_000 && @socket_sendto($s, 'x', 1, MSG_DONTWAIT, $agent->dgramPath) === 1) {
            $queued++;
        }
        check($queued < 10_000, 'the queue filled up');
        $ms = timed($dir, $agent->env(), $phpArgs);
        check($ms < FAST_MS, "datagram to a full queue took $ms ms");
        same($queued, count($agent->datagrams()), 'only the filler datagrams are queued');
        socket_close($agent->dgram);
        socket_close($agent->stream);
        unlink($agent->dgramPath);
        unlink($agent->streamPath);
    });

    test("[$transport] agent not accepting: a frame that fits the socket buffer is queued whole without waiting", function () use ($dir, $phpArgs): void {
        $agent = new FakeAgent($dir);
        $ms = timed($dir, $agent->env(['APM_MAX_DATAGRAM' => '1024']), $phpArgs, 100_000);
        check($ms < FAST_MS, "frame took $ms ms");
        $conns = $agent->connections();
        same(1, count($conns), 'connections');
        $f = frames($conns[0]);
        same(1, count($f), 'frames');
        check(strlen(decode($f[0])['tags']['pad']) === 100_000, 'the whole profile arrived');
        socket_close($agent->dgram);
        socket_close($agent->stream);
        unlink($agent->dgramPath);
        unlink($agent->streamPath);
    });

    test("[$transport] agent not reading a frame larger than the socket buffer: waits at most APM_STREAM_WAIT_MS, then drops", function () use ($dir, $phpArgs): void {
        $agent = new FakeAgent($dir);
        $env = $agent->env(['APM_MAX_DATAGRAM' => '1024', 'APM_MAX_PAYLOAD' => (string) (8 << 20)]);
        $ms = timed($dir, $env + ['APM_STREAM_WAIT_MS' => '0'], $phpArgs, 2 << 20);
        check($ms < FAST_MS, "with APM_STREAM_WAIT_MS=0 the 2 MiB frame took $ms ms");
        $ms = timed($dir, $env + ['APM_STREAM_WAIT_MS' => '30'], $phpArgs, 2 << 20);
        check($ms >= 29.0 && $ms < 30 + 4 * FAST_MS, "with APM_STREAM_WAIT_MS=30 the 2 MiB frame took $ms ms");
        foreach ($agent->connections() as $c) {
            check(strlen($c) < (2 << 20), 'each frame was torn (the agent closes such a connection)');
        }
        socket_close($agent->dgram);
        socket_close($agent->stream);
        unlink($agent->dgramPath);
        unlink($agent->streamPath);
    });
}

done();
