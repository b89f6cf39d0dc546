<?php

/**
 * A tiny app for the demo, the end-to-end tests and the overhead benchmark. Every URL is routed
 * here (nginx `try_files ... /index.php`, or SCRIPT_FILENAME set by the FastCGI driver):
 *
 *   /                   a small HTML page
 *   /work?ms=N          N ms of CPU
 *   /sleep?ms=N         N ms of waiting
 *   /big?kb=N           an N KiB body with a Content-Length header
 *   /status/NNN         an empty response with status NNN (100..599)
 *   /error              an uncaught exception: 500
 *   /fatal              a fatal error (undefined function): 500
 *   /pad?bytes=N        tags the profile with N bytes, to get profiles of a given size
 *   /echo               the request's id query value back (end-to-end tests match on it)
 *   /info               JSON: SAPI, pid, and whether the sockets extension and opcache are loaded
 *   /destruct           "body", then "destructor" printed by a global object's destructor, which
 *                       PHP runs after the shutdown functions (lost after fastcgi_finish_request)
 *
 * Any path also takes ?pad=N (as /pad) and ?ms=N is capped at 1000. Every response carries
 * `X-Demo-Pid: <worker pid>`, so a client knows which worker answered even when the profile
 * was lost (the end-to-end test compares that with the kernel's per-worker counts).
 */

declare(strict_types=1);

header('X-Demo-Pid: ' . getmypid());

$path = parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH) ?: '/';
$ms = min(1000, max(0, (int) ($_GET['ms'] ?? 0)));
$pad = min(16 << 20, max(0, (int) ($_GET['pad'] ?? $_GET['bytes'] ?? 0)));
if ($pad > 0 && class_exists(\Bitville\Apm\Listener::class, false)) {
    \Bitville\Apm\Listener::tag('pad', str_repeat('p', $pad));
}

switch (true) {
    case $path === '/':
        header('Content-Type: text/html; charset=utf-8');
        echo "<!doctype html><title>demo</title><h1>Bitville APM demo</h1><p>pid ", getmypid(), "</p>\n";
        break;
    case $path === '/work':
        $end = hrtime(true) + $ms * 1_000_000;
        $n = 0;
        while (hrtime(true) < $end) {
            $n = ($n * 31 + 7) % 1_000_003;
        }
        header('Content-Type: application/json');
        echo json_encode(['work_ms' => $ms, 'n' => $n]), "\n";
        break;
    case $path === '/sleep':
        usleep($ms * 1000);
        echo "slept {$ms} ms\n";
        break;
    case $path === '/big':
        $kb = min(16 << 10, max(0, (int) ($_GET['kb'] ?? 64)));
        $body = str_repeat(str_repeat('x', 1023) . "\n", $kb);
        header('Content-Type: text/plain');
        header('Content-Length: ' . strlen($body));
        echo $body;
        break;
    case preg_match('#^/status/([1-5][0-9][0-9])$#', $path, $m) === 1:
        http_response_code((int) $m[1]);
        break;
    case $path === '/error':
        throw new RuntimeException('demo error');
    case $path === '/fatal':
        undefined_demo_function();
        break;
    case $path === '/pad':
        echo "padded {$pad}\n";
        break;
    case $path === '/echo':
        header('Content-Type: text/plain');
        echo (string) ($_GET['id'] ?? ''), "\n";
        break;
    case $path === '/info':
        header('Content-Type: application/json');
        echo json_encode([
            'sapi' => PHP_SAPI,
            'pid' => getmypid(),
            'sockets' => extension_loaded('sockets'),
            'opcache' => function_exists('opcache_get_status') && (opcache_get_status(false)['opcache_enabled'] ?? false),
        ]), "\n";
        break;
    case $path === '/destruct':
        $GLOBALS['demo_destruct'] = new class () {
            public function __destruct()
            {
                echo "destructor\n";
            }
        };
        echo "body\n";
        break;
    default:
        http_response_code(404);
        echo "not found\n";
}
