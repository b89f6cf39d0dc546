<?php

/**
 * A tiny test harness for the listener's tests: no PHPUnit. Each test file calls test() for each
 * case; every case prints "ok - name" or "not ok - name: reason", and the file exits non-zero
 * when any case failed. php/tests/run.php runs every test_*.php file and adds the counts up.
 *
 * The listener is exercised for real: each case runs a child `php` with
 * `-d auto_prepend_file=php/listener.php` on a small app, with the environment pointing the
 * listener at sockets that this process binds in a temporary directory.
 */

declare(strict_types=1);

const LISTENER = __DIR__ . '/../listener.php';

final class TestFailure extends \Exception
{
}

$GLOBALS['__passed'] = 0;
$GLOBALS['__failed'] = 0;

function test(string $name, callable $fn): void
{
    try {
        $fn();
        $GLOBALS['__passed']++;
        echo "ok - $name\n";
    } catch (\Throwable $e) {
        $GLOBALS['__failed']++;
        $where = $e instanceof TestFailure ? '' : ' (' . get_class($e) . ' at ' . basename($e->getFile()) . ':' . $e->getLine() . ')';
        echo "not ok - $name: " . str_replace("\n", "\n    ", $e->getMessage()) . "$where\n";
    }
}

/** Prints the summary line and exits non-zero on any failure. */
function done(): never
{
    printf("# this file: %d ok, %d not ok\n", $GLOBALS['__passed'], $GLOBALS['__failed']);
    exit($GLOBALS['__failed'] === 0 ? 0 : 1);
}

function check(bool $cond, string $msg): void
{
    if (!$cond) {
        throw new TestFailure($msg);
    }
}

function same(mixed $expected, mixed $actual, string $what): void
{
    if ($expected !== $actual) {
        $show = static fn (mixed $v): string => (strlen($e = var_export($v, true)) > 400 ? substr($e, 0, 400) . '...' : $e);
        throw new TestFailure("$what: expected " . $show($expected) . ', got ' . $show($actual));
    }
}

/** A fresh temporary directory, removed at exit. Short, so socket paths fit in sun_path. */
function tmpdir(): string
{
    $dir = sys_get_temp_dir() . '/apmt-' . bin2hex(random_bytes(4));
    mkdir($dir, 0700);
    register_shutdown_function(static function () use ($dir): void {
        foreach (glob($dir . '/{,.}*', GLOB_BRACE) ?: [] as $f) {
            if (is_file($f) || is_link($f) || filetype($f) === 'socket') {
                @unlink($f);
            }
        }
        @rmdir($dir);
    });
    return $dir;
}

/** A test "agent": the datagram and stream sockets the listener sends to, bound in $dir. */
final class FakeAgent
{
    public string $dgramPath;
    public string $streamPath;
    public \Socket $dgram;
    public \Socket $stream;

    public function __construct(public string $dir, bool $bindStream = true)
    {
        $this->dgramPath = $dir . '/listener.sock';
        $this->streamPath = $dir . '/listener-stream.sock';
        // A previous case that failed half-way may have left its socket files behind.
        @unlink($this->dgramPath);
        @unlink($this->streamPath);
        $this->dgram = socket_create(AF_UNIX, SOCK_DGRAM, 0) ?: throw new \RuntimeException('socket');
        socket_bind($this->dgram, $this->dgramPath) || throw new \RuntimeException('bind dgram');
        socket_set_nonblock($this->dgram);
        if ($bindStream) {
            $this->stream = socket_create(AF_UNIX, SOCK_STREAM, 0) ?: throw new \RuntimeException('socket');
            socket_bind($this->stream, $this->streamPath) || throw new \RuntimeException('bind stream');
            socket_listen($this->stream, 64);
            socket_set_nonblock($this->stream);
        }
    }

    /** @return array<string, string> the environment that points the listener here */
    public function env(array $extra = []): array
    {
        return $extra + [
            'APM_SOCKET' => $this->dgramPath,
            'APM_STREAM_SOCKET' => $this->streamPath,
            'APM_RUNTIME_DIR' => $this->dir,
        ];
    }

    /** @return list<string> every datagram queued now (raw bytes) */
    public function datagrams(): array
    {
        $out = [];
        while (true) {
            $buf = '';
            $from = '';
            $n = @socket_recvfrom($this->dgram, $buf, 4 * 1024 * 1024, MSG_DONTWAIT, $from);
            if ($n === false) {
                return $out;
            }
            $out[] = $buf;
        }
    }

    /**
     * Accepts every pending connection and reads each to EOF (the sender has exited).
     * @return list<string> the raw bytes of each connection
     */
    public function connections(): array
    {
        $out = [];
        while (($c = @socket_accept($this->stream)) !== false) {
            socket_set_block($c);
            $data = '';
            while (($chunk = socket_read($c, 1 << 20)) !== false && $chunk !== '') {
                $data .= $chunk;
            }
            socket_close($c);
            $out[] = $data;
        }
        return $out;
    }
}

/** Splits a stream connection's bytes into frames; throws on a torn frame. */
function frames(string $bytes): array
{
    $out = [];
    $off = 0;
    while ($off < strlen($bytes)) {
        check(strlen($bytes) - $off >= 4, 'torn frame header');
        $len = unpack('N', $bytes, $off)[1];
        check(strlen($bytes) - $off - 4 >= $len, "torn frame: header says $len bytes, " . (strlen($bytes) - $off - 4) . ' follow');
        $out[] = substr($bytes, $off + 4, $len);
        $off += 4 + $len;
    }
    return $out;
}

/** @return array<string, mixed> */
function decode(string $json): array
{
    $v = json_decode($json, true, 512, JSON_THROW_ON_ERROR);
    check(is_array($v), 'profile is not a JSON object');
    return $v;
}

final class Run
{
    public function __construct(
        public int $exit,
        public string $stdout,
        public string $stderr,
        public float $seconds,
        public string $script,
    ) {
    }
}

/**
 * Runs $code (a PHP script, written to a file) in a child php with the listener prepended
 * (unless $listener is false). Warnings go to stderr (display_errors=stderr, E_ALL) so a test can
 * assert the listener printed nothing. $phpArgs come after those defaults (e.g. ['-n'] to drop the
 * sockets extension). The environment is only what is given, plus PATH.
 *
 * @param array<string, string> $env
 * @param list<string> $phpArgs
 */
function run_php(string $dir, string $code, array $env, array $phpArgs = [], bool $listener = true): Run
{
    static $n = 0;
    $script = $dir . '/app' . ($n++) . '.php';
    file_put_contents($script, $code);
    $cmd = [PHP_BINARY, '-d', 'display_errors=stderr', '-d', 'error_reporting=-1', '-d', 'log_errors=0', ...$phpArgs];
    if ($listener) {
        $cmd[] = '-d';
        $cmd[] = 'auto_prepend_file=' . realpath(LISTENER);
    }
    $cmd[] = $script;
    $env += ['PATH' => getenv('PATH') ?: '/usr/bin:/bin'];
    $t = hrtime(true);
    $p = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, $dir, $env);
    check(is_resource($p), 'cannot start php');
    $out = stream_get_contents($pipes[1]);
    $err = stream_get_contents($pipes[2]);
    fclose($pipes[1]);
    fclose($pipes[2]);
    $exit = proc_close($p);
    return new Run($exit, (string) $out, (string) $err, (hrtime(true) - $t) / 1e9, $script);
}

/** The one profile a run must have sent as a datagram (and nothing over the stream). */
function one_datagram(FakeAgent $agent): array
{
    $d = $agent->datagrams();
    same(1, count($d), 'datagrams received');
    same([], $agent->connections(), 'stream connections');
    return decode($d[0]);
}
