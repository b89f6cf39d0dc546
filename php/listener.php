<?php

/**
 * Bitville APM listener: loaded in every request through `auto_prepend_file`.
 *
 * Measures the request and, once it is over, sends one JSON profile to the local agent
 * (`apm-agent`) over a Unix datagram socket, or over the stream socket when the profile is too
 * large for a datagram. Fire-and-forget: it never throws, never prints, never changes the
 * response and never waits on the agent; any error drops the profile silently.
 *
 * Configuration, field names and the reasoning behind each choice: php/README.md.
 */

declare(strict_types=1);

namespace Bitville\Apm;

// A second include (the file named twice in auto_prepend_file and require) must not redeclare
// the class or measure the request twice.
if (!\class_exists(Listener::class, false)) {
    final class Listener
    {
        /** Schema version of the profile JSON ("v"). */
        public const SCHEMA = 1;

        /** [env var, php.ini key (read with get_cfg_var), default]. */
        private const CONFIG = [
            'enabled' => ['APM_ENABLED', 'apm.enabled', '1'],
            'socket' => ['APM_SOCKET', 'apm.socket', '/run/bitville-apm/listener.sock'],
            'stream_socket' => ['APM_STREAM_SOCKET', 'apm.stream_socket', '/run/bitville-apm/listener-stream.sock'],
            'runtime_dir' => ['APM_RUNTIME_DIR', 'apm.runtime_dir', '/run/bitville-apm'],
            'max_datagram' => ['APM_MAX_DATAGRAM', 'apm.max_datagram', '65536'],
            'max_payload' => ['APM_MAX_PAYLOAD', 'apm.max_payload', '1048576'],
            'stream_wait_ms' => ['APM_STREAM_WAIT_MS', 'apm.stream_wait_ms', '10'],
            'xhprof' => ['APM_XHPROF', 'apm.xhprof', '1'],
            'finish_request' => ['APM_FINISH_REQUEST', 'apm.finish_request', '1'],
        ];

        /** Linux MSG_NOSIGNAL: a peer that closed mid-frame must not SIGPIPE the worker. */
        private const MSG_NOSIGNAL = 0x4000;

        /** @var array<string, mixed>|null Per-request state; null when this request is not profiled. */
        private static ?array $req = null;

        /** @var array<string, mixed> */
        private static array $tags = [];

        /**
         * Runs at include time: decides whether this request is profiled (switch, kill switch,
         * sample rate) and, if so, records the starting figures and registers the shutdown hook.
         */
        public static function start(): void
        {
            \set_error_handler(static fn (): bool => true);
            try {
                if (!self::flag(self::config('enabled'))) {
                    return;
                }
                $dir = self::config('runtime_dir');
                // The kill switch costs one stat(); a missing sample-rate file means "agent never
                // ran here", so profile everything (the sends then fail fast with ENOENT).
                if (\file_exists($dir . '/disabled')) {
                    return;
                }
                $rate = 1.0;
                $text = \file_get_contents($dir . '/sample-rate');
                if (\is_string($text) && \is_numeric($t = \trim($text))) {
                    $rate = \max(0.0, \min(1.0, (float) $t));
                }
                if ($rate < 1.0 && ($rate <= 0.0 || \random_int(0, 999_999) >= (int) ($rate * 1_000_000))) {
                    return;
                }
                $ru = \getrusage();
                $xhprof = null;
                if (self::flag(self::config('xhprof'))) {
                    if (\function_exists('tideways_xhprof_enable')) {
                        \tideways_xhprof_enable(self::constOr('TIDEWAYS_XHPROF_FLAGS_CPU', 2) | self::constOr('TIDEWAYS_XHPROF_FLAGS_MEMORY', 4));
                        $xhprof = 'tideways_xhprof';
                    } elseif (\function_exists('xhprof_enable')) {
                        \xhprof_enable(self::constOr('XHPROF_FLAGS_CPU', 2) | self::constOr('XHPROF_FLAGS_MEMORY', 4));
                        $xhprof = 'xhprof';
                    }
                }
                self::$req = [
                    'rate' => $rate,
                    'utime' => $ru['ru_utime.tv_sec'] * 1_000_000 + $ru['ru_utime.tv_usec'],
                    'stime' => $ru['ru_stime.tv_sec'] * 1_000_000 + $ru['ru_stime.tv_usec'],
                    'xhprof' => $xhprof,
                    'start' => \microtime(true),
                ];
                \register_shutdown_function([self::class, 'onShutdown']);
            } catch (\Throwable) {
                self::$req = null;
            } finally {
                \restore_error_handler();
            }
        }

        /**
         * Attaches a custom attribute to this request's profile ("tags" in the JSON), e.g. the
         * route name. A no-op when the request is not profiled. Values must be JSON-encodable.
         */
        public static function tag(string $key, mixed $value): void
        {
            if (self::$req !== null) {
                self::$tags[$key] = $value;
            }
        }

        /** Whether this request is being profiled (enabled, not killed, sampled in). */
        public static function active(): bool
        {
            return self::$req !== null;
        }

        /**
         * First shutdown function (registered before any of the application's): re-registers the
         * real work so that it runs after the application's own shutdown functions, which are then
         * measured and keep their output, headers and error_get_last().
         *
         * @internal
         */
        public static function onShutdown(): void
        {
            try {
                \register_shutdown_function([self::class, 'finish']);
            } catch (\Throwable) {
            }
        }

        /** @internal Last shutdown function: measure, encode, send. */
        public static function finish(): void
        {
            $req = self::$req;
            self::$req = null;
            if ($req === null) {
                return;
            }
            \set_error_handler(static fn (): bool => true);
            try {
                $profile = self::profile($req);
                $finish = self::flag(self::config('finish_request'));
                if ($finish && \function_exists('fastcgi_finish_request')) {
                    // On by default (APM_FINISH_REQUEST=0 turns it off): the client has its
                    // response before the encoding and the send; later output is discarded.
                    \fastcgi_finish_request();
                }
                self::send($profile);
            } catch (\Throwable) {
                // Dropped silently: the agent counts what it does not receive via eBPF.
            } finally {
                \restore_error_handler();
            }
        }

        /**
         * @param array<string, mixed> $req
         * @return array<string, mixed>
         */
        private static function profile(array $req): array
        {
            $end = \microtime(true);
            $ru = \getrusage();
            $s = $_SERVER;
            $begin = \is_float($s['REQUEST_TIME_FLOAT'] ?? null) ? $s['REQUEST_TIME_FLOAT'] : $req['start'];
            $status = \http_response_code();
            $p = [
                'v' => self::SCHEMA,
                'id' => \bin2hex(\random_bytes(16)),
                'ts_us' => (int) \round($begin * 1_000_000),
                'wall_us' => \max(0, (int) \round(($end - $begin) * 1_000_000)),
                'cpu_user_us' => \max(0, $ru['ru_utime.tv_sec'] * 1_000_000 + $ru['ru_utime.tv_usec'] - $req['utime']),
                'cpu_sys_us' => \max(0, $ru['ru_stime.tv_sec'] * 1_000_000 + $ru['ru_stime.tv_usec'] - $req['stime']),
                'mem_peak_bytes' => \memory_get_peak_usage(),
                'status' => \is_int($status) ? $status : null,
                'method' => self::str($s['REQUEST_METHOD'] ?? null),
                'uri' => self::str($s['REQUEST_URI'] ?? null),
                'host' => self::str($s['HTTP_HOST'] ?? $s['SERVER_NAME'] ?? null),
                'script' => self::str($s['SCRIPT_FILENAME'] ?? null),
                'response_bytes' => self::responseBytes(),
                'sapi' => \PHP_SAPI,
                'hostname' => (string) \gethostname(),
                'pid' => \getmypid(),
                'sample_rate' => $req['rate'],
            ];
            $err = \error_get_last();
            if ($err !== null && ($err['type'] & (\E_ERROR | \E_PARSE | \E_CORE_ERROR | \E_COMPILE_ERROR | \E_USER_ERROR | \E_RECOVERABLE_ERROR)) !== 0) {
                $p['error'] = [
                    'type' => $err['type'],
                    'message' => \substr($err['message'], 0, 1024),
                    'file' => $err['file'],
                    'line' => $err['line'],
                ];
            }
            if (self::$tags !== []) {
                $p['tags'] = self::$tags;
                self::$tags = [];
            }
            if ($req['xhprof'] === 'tideways_xhprof') {
                $p['xhprof'] = \tideways_xhprof_disable();
                $p['xhprof_ext'] = 'tideways_xhprof';
            } elseif ($req['xhprof'] === 'xhprof') {
                $p['xhprof'] = \xhprof_disable();
                $p['xhprof_ext'] = 'xhprof';
            }
            return $p;
        }

        /**
         * Bytes of response body: the Content-Length header when the application set one; else,
         * when nothing has reached the client yet (headers not sent), everything still held in
         * PHP's output buffers, which is then the whole body; else unknown (null).
         */
        private static function responseBytes(): ?int
        {
            foreach (\headers_list() as $h) {
                if (\strncasecmp($h, 'content-length:', 15) === 0) {
                    $v = \trim(\substr($h, 15));
                    return \ctype_digit($v) ? (int) $v : null;
                }
            }
            if (\headers_sent()) {
                return null;
            }
            $n = 0;
            foreach (\ob_get_status(true) as $b) {
                $n += (int) ($b['buffer_used'] ?? 0);
            }
            return $n;
        }

        /** @param array<string, mixed> $profile */
        private static function send(array $profile): void
        {
            $flags = \JSON_UNESCAPED_SLASHES | \JSON_UNESCAPED_UNICODE | \JSON_INVALID_UTF8_SUBSTITUTE | \JSON_PARTIAL_OUTPUT_ON_ERROR;
            $json = \json_encode($profile, $flags);
            if (!\is_string($json)) {
                return;
            }
            $max = (int) self::config('max_payload');
            if (\strlen($json) > $max && isset($profile['xhprof'])) {
                // The call graph is what makes a profile big: keep the request's figures.
                unset($profile['xhprof']);
                $profile['xhprof_dropped'] = true;
                $json = \json_encode($profile, $flags);
                if (!\is_string($json)) {
                    return;
                }
            }
            $len = \strlen($json);
            if ($len > $max) {
                return;
            }
            if ($len <= (int) self::config('max_datagram')) {
                self::sendDatagram(self::config('socket'), $json);
            } else {
                self::sendFrame(self::config('stream_socket'), \pack('N', $len) . $json);
            }
        }

        private static function sendDatagram(string $path, string $json): bool
        {
            if (\function_exists('socket_sendto')) {
                $s = \socket_create(\AF_UNIX, \SOCK_DGRAM, 0);
                if ($s === false) {
                    return false;
                }
                $n = \socket_sendto($s, $json, \strlen($json), \MSG_DONTWAIT, $path);
                \socket_close($s);
                return $n === \strlen($json);
            }
            // Streams fallback: connect() then send(); the stream is non-blocking before the write
            // so a full queue is EAGAIN (fwrite returns 0), never a wait.
            $fp = \stream_socket_client('udg://' . $path, $errno, $errstr, 0.0);
            if ($fp === false) {
                return false;
            }
            \stream_set_blocking($fp, false);
            $n = \fwrite($fp, $json);
            \fclose($fp);
            return $n === \strlen($json);
        }

        /**
         * One frame (4-byte big-endian length + JSON) on a fresh non-blocking connection. A frame
         * larger than the socket's send buffer (~208 KiB by default) cannot be written at once: the
         * rest is written as the agent reads, for at most stream_wait_ms, else the frame is torn
         * (the agent then closes that connection) and dropped.
         */
        private static function sendFrame(string $path, string $frame): bool
        {
            $total = \strlen($frame);
            $deadline = \hrtime(true) + (int) self::config('stream_wait_ms') * 1_000_000;
            if (\function_exists('socket_send')) {
                $s = \socket_create(\AF_UNIX, \SOCK_STREAM, 0);
                if ($s === false) {
                    return false;
                }
                try {
                    // Non-blocking: a full listen backlog fails the connect instead of waiting.
                    if (!\socket_set_nonblock($s) || !\socket_connect($s, $path)) {
                        return false;
                    }
                    $off = 0;
                    while (true) {
                        $n = \socket_send($s, $off === 0 ? $frame : \substr($frame, $off), $total - $off, \MSG_DONTWAIT | self::MSG_NOSIGNAL);
                        if ($n === false && \socket_last_error($s) !== \SOCKET_EAGAIN) {
                            return false;
                        }
                        $off += (int) $n;
                        if ($off >= $total) {
                            return true;
                        }
                        $left = $deadline - \hrtime(true);
                        if ($left <= 0) {
                            return false;
                        }
                        $r = null;
                        $w = [$s];
                        $e = null;
                        if (\socket_select($r, $w, $e, 0, \intdiv($left, 1000)) < 1) {
                            return false;
                        }
                    }
                } finally {
                    \socket_close($s);
                }
            }
            $fp = \stream_socket_client('unix://' . $path, $errno, $errstr, 0.0);
            if ($fp === false) {
                return false;
            }
            try {
                \stream_set_blocking($fp, false);
                $off = 0;
                while (true) {
                    $n = \fwrite($fp, $off === 0 ? $frame : \substr($frame, $off));
                    if ($n === false) {
                        return false;
                    }
                    $off += $n;
                    if ($off >= $total) {
                        return true;
                    }
                    $left = $deadline - \hrtime(true);
                    if ($left <= 0) {
                        return false;
                    }
                    $r = null;
                    $w = [$fp];
                    $e = null;
                    if (\stream_select($r, $w, $e, 0, \intdiv($left, 1000)) < 1) {
                        return false;
                    }
                }
            } finally {
                \fclose($fp);
            }
        }

        /** Environment (php-fpm `env[...]` or fastcgi_param) first, then php.ini, then the default. */
        private static function config(string $key): string
        {
            [$env, $ini, $default] = self::CONFIG[$key];
            $v = \getenv($env);
            if (\is_string($v) && $v !== '') {
                return $v;
            }
            $v = \get_cfg_var($ini);
            return \is_string($v) && $v !== '' ? $v : $default;
        }

        private static function flag(string $v): bool
        {
            return !\in_array(\strtolower($v), ['0', 'off', 'false', 'no'], true);
        }

        private static function constOr(string $name, int $default): int
        {
            return \defined($name) ? (int) \constant($name) : $default;
        }

        private static function str(mixed $v): ?string
        {
            return \is_string($v) ? $v : null;
        }
    }

    Listener::start();
}
