<?php

// The benchmark's app. It builds ?entries=N xhprof-shaped call-graph entries ("parent==>child" =>
// ct, wt, cpu, mu, pmu; ~70 bytes of JSON each) in every variant, so the app's own work is the
// same with and without the listener, and attaches them to the profile when the listener is
// loaded: that sets the profile's size the way real call data would.
$n = (int) ($_GET['entries'] ?? 0);
$calls = [];
for ($i = 0; $i < $n; $i++) {
    $calls["App\\Service\\Repo{$i}::find==>PDOStatement::execute"] = ['ct' => $i % 7 + 1, 'wt' => 1000 + $i, 'cpu' => 800 + $i, 'mu' => 2048 + $i, 'pmu' => 4096];
}
if (class_exists(\Bitville\Apm\Listener::class, false)) {
    \Bitville\Apm\Listener::tag('calls', $calls);
}
echo "ok\n";
