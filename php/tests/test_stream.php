<?php

/**
 * Transport choice by size: up to APM_MAX_DATAGRAM bytes a profile is one datagram; above it, one
 * frame (4-byte big-endian length + JSON) on the stream socket; above APM_MAX_PAYLOAD the xhprof
 * data is dropped first, then the profile. Both with the sockets extension and the streams
 * fallback (`php -n`: no sockets extension).
 */

declare(strict_types=1);

require __DIR__ . '/lib.php';

const PAD_APP = '<?php \Bitville\Apm\Listener::tag("pad", str_repeat("p", (int) getenv("PAD")));';

/** Runs PAD_APP while reading the stream socket, so frames larger than a socket buffer flow. */
function run_reading(FakeAgent $agent, array $env, array $phpArgs): array
{
    $script = $agent->dir . '/pad.php';
    file_put_contents($script, PAD_APP);
    $cmd = [PHP_BINARY, ...$phpArgs, '-d', 'display_errors=stderr', '-d', 'auto_prepend_file=' . realpath(LISTENER), $script];
    $p = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, $agent->dir, $env + ['PATH' => getenv('PATH') ?: '/usr/bin:/bin']);
    $conns = [];
    $exit = null;
    $deadline = microtime(true) + 10;
    $c = false;
    // Accept while the child runs; proc_get_status() reports the exit code only once.
    while (microtime(true) < $deadline && ($c = @socket_accept($agent->stream)) === false) {
        $st = proc_get_status($p);
        if (!$st['running']) {
            $exit = $st['exitcode'];
            break;
        }
        usleep(200);
    }
    if ($c === false) {
        $c = @socket_accept($agent->stream);
    }
    if ($c !== false) {
        socket_set_block($c);
        $data = '';
        while (($chunk = socket_read($c, 1 << 20)) !== false && $chunk !== '') {
            $data .= $chunk;
        }
        socket_close($c);
        $conns[] = $data;
    }
    $err = stream_get_contents($pipes[2]);
    fclose($pipes[1]);
    fclose($pipes[2]);
    $closed = proc_close($p);
    same(0, $exit ?? $closed, 'exit code');
    same('', $err, 'stderr');
    return [$conns, $agent->datagrams()];
}

foreach (['sockets' => [], 'streams' => ['-n']] as $transport => $phpArgs) {
    $dir = tmpdir();
    $agent = new FakeAgent($dir);

    test("[$transport] the child has the sockets extension only in the sockets variant", function () use ($dir, $phpArgs, $transport): void {
        $r = run_php($dir, '<?php echo extension_loaded("sockets") ? "sockets" : "streams";', [], $phpArgs, false);
        same($transport, $r->stdout, 'transport available to the listener');
    });

    test("[$transport] the datagram limit decides: just under it a datagram, just over it a frame", function () use ($agent, $phpArgs): void {
        // The size of the unpadded profile; the figures in it (timings, pid, memory) vary by a
        // few digits from run to run, hence the 32-byte margin on each side of the limit.
        [, $d] = run_reading($agent, $agent->env(['PAD' => '0']), $phpArgs);
        same(1, count($d), 'datagrams');
        $base = strlen($d[0]);
        $limit = 4096;
        [$conns, $d] = run_reading($agent, $agent->env(['PAD' => (string) ($limit - $base - 32), 'APM_MAX_DATAGRAM' => (string) $limit]), $phpArgs);
        same([], $conns, 'stream connections just under the limit');
        same(1, count($d), 'datagrams just under the limit');
        same($limit - $base - 32, strlen(decode($d[0])['tags']['pad']), 'padding');
        [$conns, $d] = run_reading($agent, $agent->env(['PAD' => (string) ($limit - $base + 32), 'APM_MAX_DATAGRAM' => (string) $limit]), $phpArgs);
        same([], $d, 'datagrams just over the limit');
        same(1, count($conns), 'stream connections just over the limit');
        same($limit - $base + 32, strlen(decode(frames($conns[0])[0])['tags']['pad']), 'padding');
    });

    test("[$transport] a profile larger than the default 64 KiB datagram limit goes over the stream socket as one frame", function () use ($agent, $phpArgs): void {
        [$conns, $d] = run_reading($agent, $agent->env(['PAD' => (string) (100 << 10)]), $phpArgs);
        same([], $d, 'datagrams');
        same(1, count($conns), 'stream connections');
        $f = frames($conns[0]);
        same(1, count($f), 'frames on the connection');
        same(strlen($conns[0]) - 4, strlen($f[0]), 'the length prefix (big-endian) matches the JSON');
        $p = decode($f[0]);
        same(100 << 10, strlen($p['tags']['pad']), 'the whole profile arrived');
        same(1, $p['v'], 'v');
    });

    test("[$transport] a 3 MiB profile larger than the socket buffer streams through to a reading agent", function () use ($agent, $phpArgs): void {
        $env = $agent->env(['PAD' => (string) (3 << 20), 'APM_MAX_PAYLOAD' => (string) (4 << 20), 'APM_STREAM_WAIT_MS' => '2000']);
        [$conns, $d] = run_reading($agent, $env, $phpArgs);
        same([], $d, 'datagrams');
        same(1, count($conns), 'stream connections');
        $f = frames($conns[0]);
        same(3 << 20, strlen(decode($f[0])['tags']['pad']), 'pad length');
    });

    test("[$transport] a profile over APM_MAX_PAYLOAD is dropped", function () use ($agent, $phpArgs): void {
        [$conns, $d] = run_reading($agent, $agent->env(['PAD' => (string) (300 << 10), 'APM_MAX_PAYLOAD' => (string) (256 << 10)]), $phpArgs);
        same([], $conns, 'stream connections');
        same([], $d, 'datagrams');
    });

    test("[$transport] over APM_MAX_PAYLOAD because of xhprof data: the call data is dropped, the figures sent", function () use ($agent, $phpArgs): void {
        $stub = $agent->dir . '/xhprof-big.php';
        file_put_contents($stub, '<?php function xhprof_enable(int $f = 0): void {} '
            . 'function xhprof_disable(): array { return ["main()" => ["ct" => 1, "junk" => str_repeat("j", 200_000)]]; } '
            . 'require ' . var_export(realpath(LISTENER), true) . ';');
        $script = $agent->dir . '/x.php';
        file_put_contents($script, '<?php ');
        $env = $agent->env(['APM_MAX_PAYLOAD' => (string) (128 << 10), 'PATH' => getenv('PATH') ?: '/usr/bin:/bin']);
        $p = proc_open([PHP_BINARY, ...$phpArgs, '-d', 'auto_prepend_file=' . $stub, $script], [], $pipes, $agent->dir, $env);
        same(0, proc_close($p), 'exit code');
        $prof = one_datagram($agent);
        same(true, $prof['xhprof_dropped'] ?? null, 'xhprof_dropped');
        check(!isset($prof['xhprof']), 'no xhprof field');
    });

    test("[$transport] invalid UTF-8 in the URI still gives valid JSON", function () use ($agent, $phpArgs): void {
        [, $d] = run_reading($agent, $agent->env(['PAD' => '0', 'REQUEST_URI' => "/caf\xe9?q=\xff"]), $phpArgs);
        same(1, count($d), 'datagrams');
        same("/caf\u{FFFD}?q=\u{FFFD}", decode($d[0])['uri'], 'uri with replacement characters');
    });
}

done();
