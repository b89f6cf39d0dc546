<?php

/**
 * Runs every php/tests/test_*.php in its own process and ends with the line
 * "N passed, N failed" (test cases, summed). Exits non-zero when any case or file failed.
 *
 *     php php/tests/run.php [filter]
 */

declare(strict_types=1);

$passed = 0;
$failed = 0;
$filter = $argv[1] ?? '';
foreach (glob(__DIR__ . '/test_*.php') ?: [] as $file) {
    if ($filter !== '' && !str_contains(basename($file), $filter)) {
        continue;
    }
    echo '# ', basename($file), "\n";
    $p = proc_open([PHP_BINARY, $file], [1 => ['pipe', 'w']], $pipes);
    $out = (string) stream_get_contents($pipes[1]);
    fclose($pipes[1]);
    $exit = proc_close($p);
    echo $out;
    $ok = preg_match_all('/^ok - /m', $out);
    $bad = preg_match_all('/^not ok - /m', $out);
    $passed += $ok;
    $failed += $bad;
    if ($exit !== 0 && $bad === 0) {
        // A crash or an uncaught error outside any case still fails the run.
        echo "not ok - ", basename($file), " exited with $exit\n";
        $failed++;
    }
}
if ($passed + $failed === 0) {
    echo "not ok - no test ran\n";
    $failed++;
}
echo "$passed passed, $failed failed\n";
exit($failed === 0 ? 0 : 1);
