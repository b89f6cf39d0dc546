<?php

/** The profile's fields, and that the listener leaves the application's behaviour alone. */

declare(strict_types=1);

require __DIR__ . '/lib.php';

$dir = tmpdir();
$agent = new FakeAgent($dir);
$req = [
    'REQUEST_METHOD' => 'POST',
    'REQUEST_URI' => '/orders/42?x=1',
    'HTTP_HOST' => 'shop.example',
];

test('a request sends one profile with every documented field', function () use ($dir, $agent, $req): void {
    $t0 = (int) (microtime(true) * 1e6);
    $r = run_php($dir, <<<'PHP'
        <?php
        http_response_code(201);
        $x = str_repeat('m', 4 << 20);           // 4 MiB of peak memory
        // 30 ms of user CPU, counted in CPU time: wall time would fall short on a busy machine.
        $cpu = function () { $r = getrusage(); return $r['ru_utime.tv_sec'] * 1_000_000 + $r['ru_utime.tv_usec']; };
        $u0 = $cpu();
        while ($cpu() - $u0 < 30_000) { $x[0] = 'n'; }
        usleep(20_000);                            // 20 ms more of wall time
        ob_start();
        echo str_repeat('b', 1234);
        PHP, $agent->env($req));
    same(0, $r->exit, 'exit code');
    same('', $r->stderr, 'stderr');
    same(str_repeat('b', 1234), $r->stdout, 'response body');
    $p = one_datagram($agent);
    $t1 = (int) (microtime(true) * 1e6);
    same(1, $p['v'], 'v');
    check(is_string($p['id']) && preg_match('/^[0-9a-f]{32}$/', $p['id']) === 1, 'id is 32 hex chars: ' . json_encode($p['id']));
    check(is_int($p['ts_us']) && $p['ts_us'] >= $t0 - 1_000_000 && $p['ts_us'] <= $t1, 'ts_us is the request start in µs: ' . $p['ts_us']);
    check(is_int($p['wall_us']) && $p['wall_us'] >= 50_000 && $p['wall_us'] < 5_000_000, 'wall_us covers the 50 ms of work: ' . $p['wall_us']);
    check(is_int($p['cpu_user_us']) && $p['cpu_user_us'] >= 30_000, 'cpu_user_us covers the 30 ms busy loop: ' . $p['cpu_user_us']);
    check($p['cpu_user_us'] + $p['cpu_sys_us'] <= $p['wall_us'] + 20_000, 'cpu time does not exceed wall time');
    check(is_int($p['cpu_sys_us']) && $p['cpu_sys_us'] >= 0, 'cpu_sys_us');
    check(is_int($p['mem_peak_bytes']) && $p['mem_peak_bytes'] >= 4 << 20, 'mem_peak_bytes covers the 4 MiB string: ' . $p['mem_peak_bytes']);
    same(201, $p['status'], 'status');
    same('POST', $p['method'], 'method');
    same('/orders/42?x=1', $p['uri'], 'uri');
    same('shop.example', $p['host'], 'host');
    same($r->script, $p['script'], 'script (the CLI sets SCRIPT_FILENAME itself)');
    same(1234, $p['response_bytes'], 'response_bytes (all of it still buffered)');
    same('cli', $p['sapi'], 'sapi');
    same(gethostname(), $p['hostname'], 'hostname');
    check(is_int($p['pid']) && $p['pid'] > 0 && $p['pid'] !== getmypid(), 'pid is the child\'s');
    same(1.0, (float) $p['sample_rate'], 'sample_rate with no sample-rate file');
    check(!isset($p['error']) && !isset($p['xhprof']) && !isset($p['tags']), 'no optional fields');
});

test('response_bytes is null once output has reached the client without a Content-Length', function () use ($dir, $agent): void {
    // The CLI has no output buffer: the first echo sends the headers.
    $r = run_php($dir, '<?php echo "hello";', $agent->env());
    same('hello', $r->stdout, 'body');
    $p = one_datagram($agent);
    same(null, $p['response_bytes'], 'response_bytes');
    same(null, $p['status'], 'status (the CLI has none unless set)');
    same(null, $p['uri'], 'uri (none in the CLI)');
});

test('ids are unique across requests', function () use ($dir, $agent): void {
    $ids = [];
    for ($i = 0; $i < 20; $i++) {
        run_php($dir, '<?php ', $agent->env());
        $ids[] = one_datagram($agent)['id'];
    }
    same(20, count(array_unique($ids)), 'distinct ids');
});

test('tags from the application are included', function () use ($dir, $agent): void {
    $r = run_php($dir, <<<'PHP'
        <?php
        \Bitville\Apm\Listener::tag('route', 'orders.show');
        \Bitville\Apm\Listener::tag('user', 7);
        echo \Bitville\Apm\Listener::active() ? 'active' : 'inactive';
        PHP, $agent->env());
    same('active', $r->stdout, 'Listener::active()');
    same(['route' => 'orders.show', 'user' => 7], one_datagram($agent)['tags'], 'tags');
});

test('a fatal error still sends a profile with status 500 and the error', function () use ($dir, $agent, $req): void {
    // PHP turns a fatal error into a 500 only with display_errors off, as in production.
    $r = run_php($dir, "<?php\nhttp_response_code(200);\nundefined_function_xyz();\n", $agent->env($req), ['-d', 'display_errors=0']);
    same(255, $r->exit, 'exit code of a fatal error');
    $p = one_datagram($agent);
    same(E_ERROR, $p['error']['type'] ?? null, 'error.type');
    same(500, $p['status'], 'status');
    check(str_contains($p['error']['message'], 'undefined_function_xyz'), 'error.message');
    same(3, $p['error']['line'], 'error.line');
});

test('exit() mid-request still sends a profile', function () use ($dir, $agent): void {
    $r = run_php($dir, '<?php echo "a"; exit(3); echo "b";', $agent->env());
    same(3, $r->exit, 'exit code');
    same('a', $r->stdout, 'body');
    one_datagram($agent);
});

test('the app\'s shutdown functions run first, keep their output, and are measured', function () use ($dir, $agent): void {
    $r = run_php($dir, <<<'PHP'
        <?php
        ob_start();
        register_shutdown_function(function () {
            usleep(40_000);
            echo "from shutdown;";
            echo json_encode(error_get_last());
        });
        echo "body;";
        PHP, $agent->env());
    same('body;from shutdown;null', $r->stdout, 'output, and error_get_last() untouched');
    $p = one_datagram($agent);
    check($p['wall_us'] >= 40_000, 'wall_us includes the shutdown function: ' . $p['wall_us']);
    same(strlen('body;from shutdown;null'), $p['response_bytes'], 'response_bytes includes it');
});

test('no global variable, output or error leaks into the app, even with a strict error handler', function () use ($dir, $agent): void {
    $app = <<<'PHP'
        <?php
        // A handler that throws on anything, ignoring @, as some frameworks do.
        set_error_handler(function ($no, $str) { throw new ErrorException($str, 0, $no); });
        echo json_encode(array_keys(get_defined_vars())), ';', json_encode(array_map(
            fn ($c) => $c, array_values(array_filter(get_declared_classes(), fn ($c) => str_starts_with($c, 'Bitville'))))),
            ';', ob_get_level();
        PHP;
    $plain = run_php($dir, $app, $agent->env(), [], false);
    $agent->datagrams();
    // The agent is down too (no sockets at these paths): every send fails, silently.
    $with = run_php($dir, $app, $agent->env(['APM_SOCKET' => $dir . '/none.sock']));
    same('', $with->stderr, 'stderr');
    same(0, $with->exit, 'exit code');
    [$varsPlain] = explode(';', $plain->stdout);
    [$vars, $classes, $level] = explode(';', $with->stdout);
    same($varsPlain, $vars, 'global variables');
    same('["Bitville\\\\Apm\\\\Listener"]', $classes, 'declared classes');
    same('0', $level, 'output buffering level');
    same([], $agent->datagrams(), 'nothing received');
});

test('the app\'s own warnings, error handlers and error_get_last() behave as without the listener', function () use ($dir, $agent): void {
    $app = <<<'PHP'
        <?php
        echo json_encode(set_error_handler(null)), ';';
        trigger_error('app warning', E_USER_WARNING);
        echo error_get_last()['message'] ?? 'none', ';';
        set_error_handler(function ($no, $str) { echo "handled: $str;"; return true; });
        echo $undefined_variable;
        PHP;
    $plain = run_php($dir, $app, $agent->env(), [], false);
    $with = run_php($dir, $app, $agent->env());
    same('null;app warning;handled: Undefined variable $undefined_variable;', $with->stdout, 'stdout');
    same($plain->stdout, $with->stdout, 'stdout with and without the listener');
    same(str_replace($plain->script, 'APP', $plain->stderr), str_replace($with->script, 'APP', $with->stderr), 'stderr with and without the listener');
    check(str_contains($with->stderr, 'app warning'), 'the app\'s warning is displayed');
    one_datagram($agent);
});

test('including the listener twice measures the request once', function () use ($dir, $agent): void {
    $r = run_php($dir, '<?php require ' . var_export(realpath(LISTENER), true) . '; echo "x";', $agent->env());
    same('', $r->stderr, 'stderr');
    same('x', $r->stdout, 'body');
    one_datagram($agent);
});

test('php.ini keys configure it when the environment does not', function () use ($dir, $agent): void {
    $ini = ['-d', 'apm.socket=' . $agent->dgramPath, '-d', 'apm.runtime_dir=' . $dir];
    run_php($dir, '<?php ', [], $ini);
    one_datagram($agent);
    // The environment wins over php.ini.
    run_php($dir, '<?php ', ['APM_SOCKET' => $dir . '/none.sock'], $ini);
    same([], $agent->datagrams(), 'datagrams when APM_SOCKET points elsewhere');
});

test('APM_ENABLED=0 turns it off', function () use ($dir, $agent): void {
    $r = run_php($dir, '<?php echo \Bitville\Apm\Listener::active() ? "on" : "off";', $agent->env(['APM_ENABLED' => '0']));
    same('off', $r->stdout, 'active()');
    same([], $agent->datagrams(), 'datagrams');
});

test('xhprof call data is included when the extension API is present (stubbed here)', function () use ($dir, $agent): void {
    // No xhprof package exists for this PHP here: a stub with the extension's function names
    // checks the listener's side (enable at start with CPU|MEMORY, disable at end, embed).
    $stub = $dir . '/xhprof-stub.php';
    file_put_contents($stub, <<<'PHP'
        <?php
        function xhprof_enable(int $flags = 0): void { $GLOBALS['xhprof_flags'] = $flags; }
        function xhprof_disable(): array {
            return ['main()' => ['ct' => 1, 'wt' => 10, 'cpu' => 9, 'mu' => 100, 'pmu' => 200, 'flags' => $GLOBALS['xhprof_flags'] ?? -1]];
        }
        require getenv('LISTENER');
        PHP);
    $env = $agent->env(['LISTENER' => realpath(LISTENER)]);
    run_php($dir, '<?php ', $env, ['-d', 'auto_prepend_file=' . $stub], false);
    $p = one_datagram($agent);
    same('xhprof', $p['xhprof_ext'] ?? null, 'xhprof_ext');
    same(['ct' => 1, 'wt' => 10, 'cpu' => 9, 'mu' => 100, 'pmu' => 200, 'flags' => 6], $p['xhprof']['main()'] ?? null, 'xhprof data (flags CPU|MEMORY)');
    run_php($dir, '<?php ', $env + ['APM_XHPROF' => '0'], ['-d', 'auto_prepend_file=' . $stub], false);
    check(!isset(one_datagram($agent)['xhprof']), 'APM_XHPROF=0 leaves it out');
});

done();
