function compareCells(a, b, ascending) {
  if (a === '' || b === '') return (a === '') - (b === '');  // empty cells last in both directions
  var x = Number(a), y = Number(b);
  var order = (!isNaN(x) && !isNaN(y)) ? x - y : a.localeCompare(b);
  return ascending ? order : -order;
}
function sortTable(th) {
  var table = th.closest('table'), body = table.tBodies[0], column = th.cellIndex;
  var ascending = th.dataset.dir !== 'asc';
  table.querySelectorAll('thead th').forEach(function (h) { delete h.dataset.dir; });
  th.dataset.dir = ascending ? 'asc' : 'desc';
  var key = function (row) { var cell = row.cells[column]; return cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent; };
  Array.from(body.rows).sort(function (a, b) { return compareCells(key(a), key(b), ascending); })
    .forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll('table.sortable thead th').forEach(function (th) {
  th.addEventListener('click', function () { sortTable(th); });
});
// Hovering a trial anywhere (plot, legend, table row) highlights it everywhere and dims the other trials' marks.
var focused = null;
document.addEventListener('mouseover', function (event) {
  var element = event.target.closest ? event.target.closest('[data-trial]') : null;
  var trial = element ? element.dataset.trial : null;
  if (trial === focused) return;
  focused = trial;
  document.querySelectorAll('.hl').forEach(function (e) { e.classList.remove('hl'); });
  document.body.classList.toggle('focus', trial !== null);
  if (trial !== null) {
    document.querySelectorAll('[data-trial="' + CSS.escape(trial) + '"]').forEach(function (e) { e.classList.add('hl'); });
  }
});
// "errors only": hides the held-out prompts that the judged model answered exactly.
document.querySelectorAll('input[data-table]').forEach(function (box) {
  box.addEventListener('change', function () {
    document.getElementById(box.dataset.table).classList.toggle('errors-only', box.checked);
  });
});
document.documentElement.dataset.jsReady = 'true';  // the script ran to its end (checked headlessly)
