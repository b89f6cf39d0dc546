<?php

/**
 * The agent's control files in the runtime dir: the kill switch (`disabled`: present means send
 * nothing) and the sample rate (`sample-rate`: a decimal such as "0.2500\n", written atomically).
 */

declare(strict_types=1);

require __DIR__ . '/lib.php';

$dir = tmpdir();
$agent = new FakeAgent($dir);
const APP = '<?php echo \Bitville\Apm\Listener::active() ? "on" : "off";';

/**
 * Runs $n requests (in parallel batches, to keep it quick); returns how many were profiled.
 * @param list<array<string, mixed>> $profiles receives the profiles
 */
function profiled(string $dir, FakeAgent $agent, int $n, array &$profiles = []): int
{
    $script = $dir . '/sampled.php';
    file_put_contents($script, APP);
    $env = $agent->env(['PATH' => getenv('PATH') ?: '/usr/bin:/bin']);
    $active = 0;
    $received = 0;
    for ($done = 0; $done < $n; $done += 8) {
        $procs = [];
        for ($i = 0; $i < min(8, $n - $done); $i++) {
            $cmd = [PHP_BINARY, '-d', 'auto_prepend_file=' . realpath(LISTENER), $script];
            $procs[] = [proc_open($cmd, [1 => ['pipe', 'w']], $pipes, $dir, $env), $pipes];
        }
        foreach ($procs as [$p, $pipes]) {
            $active += stream_get_contents($pipes[1]) === 'on' ? 1 : 0;
            fclose($pipes[1]);
            proc_close($p);
        }
        // Drain as we go: the datagram queue holds only net.unix.max_dgram_qlen of them.
        foreach ($agent->datagrams() as $d) {
            $profiles[] = decode($d);
            $received++;
        }
    }
    same($active, $received, 'profiles received vs requests that reported themselves active');
    return $received;
}

test('the kill switch file silences the listener; removing it brings it back', function () use ($dir, $agent): void {
    file_put_contents("$dir/disabled", "paused\n");
    $r = run_php($dir, APP, $agent->env());
    same('off', $r->stdout, 'active() with the kill switch up');
    same([], $agent->datagrams(), 'datagrams with the kill switch up');
    unlink("$dir/disabled");
    $r = run_php($dir, APP, $agent->env());
    same('on', $r->stdout, 'active() with the kill switch down');
    one_datagram($agent);
});

test('the kill switch is honoured even when the agent is down', function () use ($dir): void {
    // Checked first: the only cost of a disabled listener is one stat() per request.
    file_put_contents("$dir/disabled", "spool_high_water\n");
    $r = run_php($dir, APP, ['APM_RUNTIME_DIR' => $dir, 'APM_SOCKET' => "$dir/none.sock"]);
    same('off', $r->stdout, 'active()');
    unlink("$dir/disabled");
});

test('sample rate 0 sends nothing, 1 sends everything', function () use ($dir, $agent): void {
    file_put_contents("$dir/sample-rate", "0.0000\n");
    same(0, profiled($dir, $agent, 16), 'profiles at rate 0');
    file_put_contents("$dir/sample-rate", "1.0000\n");
    same(16, profiled($dir, $agent, 16), 'profiles at rate 1');
});

test('sample rate 0.25 profiles about a quarter of the requests, and says so in the profile', function () use ($dir, $agent): void {
    file_put_contents("$dir/sample-rate", "0.2500\n");
    $n = 160;
    $profiles = [];
    $k = profiled($dir, $agent, $n, $profiles);
    // Binomial(160, 0.25): mean 40, sd 5.5; [14, 70] is beyond 4.5 sd on either side.
    check($k >= 14 && $k <= 70, "$k of $n requests profiled at rate 0.25");
    same(array_fill(0, $k, 0.25), array_column($profiles, 'sample_rate'), 'sample_rate fields');
    printf("#   %d of %d requests profiled at rate 0.25\n", $k, $n);
});

test('a missing or unreadable sample-rate file means 1.0, out-of-range values are clamped', function () use ($dir, $agent): void {
    @unlink("$dir/sample-rate");
    same(8, profiled($dir, $agent, 8), 'profiles with no file');
    file_put_contents("$dir/sample-rate", "garbage\n");
    same(8, profiled($dir, $agent, 8), 'profiles with garbage');
    file_put_contents("$dir/sample-rate", "7\n");
    run_php($dir, '<?php ', $agent->env());
    same(1.0, (float) one_datagram($agent)['sample_rate'], 'clamped to 1');
    file_put_contents("$dir/sample-rate", "-3\n");
    same(0, profiled($dir, $agent, 8), 'profiles at a negative rate (clamped to 0)');
    unlink("$dir/sample-rate");
});

done();
