window.addEventListener('error', function (event) {
  // Recorded on <html data-js-errors> for headless checks of the page (tests/test_report.py).
  var data = document.documentElement.dataset;
  data.jsErrors = (data.jsErrors || '') + event.message + '\n';
});
