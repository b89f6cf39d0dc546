<?php

/**
 * Added latency per request of listener.php under php-fpm, for ~2 KiB and ~32 KiB profiles,
 * against the same app without it, in one run.
 *
 *     php php/bench/overhead.php [requests-per-variant=3000]
 *
 * Starts one php-fpm8.2 master (as root: -R) with one pool per variant (pm static, 1 worker,
 * the system php.ini with opcache), all serving php/bench/app.php:
 *   plain         no listener
 *   apm           listener with its defaults (fastcgi_finish_request() before the send),
 *                 sending to a receiver bound here (drained between requests)
 *   apm-down      listener, no agent (socket files missing)
 *   apm-killed    listener, kill switch up (`disabled` present)
 *   apm-inline    as apm, with APM_FINISH_REQUEST=0 (the client waits for the send)
 * and times full FastCGI round trips over the pools' Unix sockets from this single-threaded
 * client, the variants interleaved in random order so that drift hits them all alike. Prints
 * median and p99 per variant and size, and the added latency (variant minus plain). A benchmark,
 * not a test: it never fails on slow numbers.
 */

declare(strict_types=1);

$perVariant = (int) ($argv[1] ?? 3000);
$warmup = 300;
$fpm = null;
foreach (['/usr/sbin/php-fpm8.2', '/usr/sbin/php-fpm', '/usr/local/sbin/php-fpm'] as $c) {
    if (is_executable($c)) {
        $fpm = $c;
        break;
    }
}
if ($fpm === null) {
    fwrite(STDERR, "php-fpm not found (apt-get install php8.2-fpm)\n");
    exit(2);
}
$listener = realpath(__DIR__ . '/../listener.php');
$app = realpath(__DIR__ . '/app.php');
$dir = sys_get_temp_dir() . '/apm-bench-' . bin2hex(random_bytes(3));
mkdir($dir);
foreach (['up', 'down', 'killed'] as $d) {
    mkdir("$dir/$d");
}
file_put_contents("$dir/killed/disabled", "paused\n");

// A receiving "agent" for the apm variant: datagrams and stream frames, drained between requests.
$rx = socket_create(AF_UNIX, SOCK_DGRAM, 0);
socket_bind($rx, "$dir/up/listener.sock");
socket_set_nonblock($rx);
$rxs = socket_create(AF_UNIX, SOCK_STREAM, 0);
socket_bind($rxs, "$dir/up/listener-stream.sock");
socket_listen($rxs, 128);
socket_set_nonblock($rxs);

$pools = [
    'plain' => null,
    'apm' => "$dir/up",
    'apm-down' => "$dir/down",
    'apm-killed' => "$dir/killed",
    'apm-inline' => "$dir/up",
];
$conf = "[global]\npid = $dir/fpm.pid\nerror_log = $dir/fpm.log\ndaemonize = no\n";
foreach ($pools as $name => $rt) {
    $conf .= "[$name]\nlisten = $dir/$name.fpm.sock\npm = static\npm.max_children = 1\nclear_env = yes\n"
        . "php_admin_value[error_log] = $dir/php-error.log\nphp_admin_flag[log_errors] = on\n";
    if ($rt !== null) {
        $conf .= "php_admin_value[auto_prepend_file] = $listener\n"
            . "env[APM_SOCKET] = $rt/listener.sock\nenv[APM_STREAM_SOCKET] = $rt/listener-stream.sock\n"
            . "env[APM_RUNTIME_DIR] = $rt\n"
            . ($name === 'apm-inline' ? "env[APM_FINISH_REQUEST] = 0\n" : '');
    }
}
file_put_contents("$dir/fpm.conf", $conf);
$proc = proc_open([$fpm, '-F', '-R', '-y', "$dir/fpm.conf"], [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', '/dev/null', 'w']], $pipes);
register_shutdown_function(static function () use ($proc, $dir): void {
    proc_terminate($proc);
    proc_close($proc);
    exec('rm -rf ' . escapeshellarg($dir));
});
$deadline = microtime(true) + 10;
while (microtime(true) < $deadline && count(glob("$dir/*.fpm.sock")) < count($pools)) {
    usleep(10_000);
}

/** One FastCGI request on a fresh connection; returns [status line or 200, body, µs]. */
function fcgi(string $sock, string $uri, string $script): array
{
    [$path, $query] = array_pad(explode('?', $uri, 2), 2, '');
    $params = ['REQUEST_METHOD' => 'GET', 'REQUEST_URI' => $uri, 'QUERY_STRING' => $query,
        'SCRIPT_FILENAME' => $script, 'SCRIPT_NAME' => '/app.php', 'DOCUMENT_URI' => $path,
        'SERVER_PROTOCOL' => 'HTTP/1.1', 'GATEWAY_INTERFACE' => 'CGI/1.1', 'HTTP_HOST' => 'bench.test',
        'REMOTE_ADDR' => '127.0.0.1', 'SERVER_NAME' => 'bench.test', 'SERVER_PORT' => '80'];
    $p = '';
    foreach ($params as $k => $v) {
        $p .= chr(strlen($k)) . (strlen($v) < 128 ? chr(strlen($v)) : pack('N', strlen($v) | 0x80000000)) . $k . $v;
    }
    $rec = static fn (int $type, string $c): string => pack('CCnnCC', 1, $type, 1, strlen($c), 0, 0) . $c;
    $msg = $rec(1, "\x00\x01\x00\x00\x00\x00\x00\x00") . $rec(4, $p) . $rec(4, '') . $rec(5, '');
    $t = hrtime(true);
    $s = stream_socket_client("unix://$sock", $errno, $errstr, 5);
    if ($s === false) {
        throw new RuntimeException("connect $sock: $errstr");
    }
    fwrite($s, $msg);
    $out = '';
    while (true) {
        $h = fread($s, 8);
        if ($h === false || strlen($h) < 8) {
            throw new RuntimeException('short FastCGI header');
        }
        $r = unpack('Cv/Ct/nid/nlen/Cpad/Cres', $h);
        $body = $r['len'] + $r['pad'] > 0 ? stream_get_contents($s, $r['len'] + $r['pad']) : '';
        if ($r['t'] === 6) {
            $out .= substr($body, 0, $r['len']);
        } elseif ($r['t'] === 3) {
            break;
        }
    }
    $us = (hrtime(true) - $t) / 1000;
    fclose($s);
    return [$out, $us];
}

function drain(Socket $rx, Socket $rxs): int
{
    $n = 0;
    $buf = '';
    $from = '';
    while (@socket_recvfrom($rx, $buf, 1 << 20, MSG_DONTWAIT, $from) !== false) {
        $n++;
    }
    while (($c = @socket_accept($rxs)) !== false) {
        socket_set_block($c);
        while (($chunk = socket_read($c, 1 << 20)) !== false && $chunk !== '') {
        }
        socket_close($c);
        $n++;
    }
    return $n;
}

// Profile sizes: the bare profile is ~450 bytes and each call-graph entry ~110; these counts
// give ~2 KiB and ~32 KiB of JSON (the sizes actually sent are printed).
$sizes = ['2KiB' => 16, '32KiB' => 310];
$lat = [];
$received = 0;
$load0 = sys_getloadavg();
$measuredSize = [];
foreach (['warmup' => $warmup, 'run' => $perVariant] as $phase => $n) {
    for ($i = 0; $i < $n; $i++) {
        $jobs = [];
        foreach ($sizes as $label => $pad) {
            foreach (array_keys($pools) as $pool) {
                $jobs[] = [$pool, $label, $pad];
            }
        }
        shuffle($jobs);
        foreach ($jobs as [$pool, $label, $pad]) {
            [$out, $us] = fcgi("$dir/$pool.fpm.sock", "/app.php?entries=$pad", $app);
            if (!str_ends_with($out, "ok\n")) {
                throw new RuntimeException("bad response from $pool: $out");
            }
            if ($pool === 'apm' || $pool === 'apm-down') {
                // The profile goes out after the response: let it land before the drain.
                usleep(200);
            }
            if ($pool === 'apm' && !isset($measuredSize[$label])) {
                $buf = '';
                $from = '';
                usleep(1000);
                if (@socket_recvfrom($rx, $buf, 1 << 20, MSG_DONTWAIT, $from) !== false) {
                    $measuredSize[$label] = strlen($buf);
                    $received++;
                }
            }
            $received += drain($rx, $rxs);
            if ($phase === 'run') {
                $lat["$pool $label"][] = $us;
            }
        }
    }
}

function pct(array $v, float $p): float
{
    sort($v);
    return $v[(int) round($p / 100 * (count($v) - 1))];
}

printf("load average before: %s\n", implode(' ', array_map(fn ($l) => sprintf('%.2f', $l), $load0)));
printf("php-fpm %s, %d requests per variant (after %d warm-up), FastCGI round trip over a Unix socket, µs\n", PHP_VERSION, $perVariant, $warmup);
printf("profile sizes sent: %s; profiles received by the bench's agent: %d\n\n", json_encode($measuredSize), $received);
printf("%-22s %9s %9s %14s %14s\n", 'variant', 'median', 'p99', 'added median', 'added p99');
foreach ($sizes as $label => $_) {
    $base = $lat["plain $label"];
    foreach (array_keys($pools) as $pool) {
        $v = $lat["$pool $label"];
        printf("%-22s %9.1f %9.1f %14s %14s\n", "$pool $label", pct($v, 50), pct($v, 99),
            $pool === 'plain' ? '-' : sprintf('%+.1f', pct($v, 50) - pct($base, 50)),
            $pool === 'plain' ? '-' : sprintf('%+.1f', pct($v, 99) - pct($base, 99)));
    }
}
$errors = @file_get_contents("$dir/php-error.log");
if (is_string($errors) && $errors !== '') {
    echo "\nphp-error.log:\n$errors";
}
