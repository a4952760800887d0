(function () {
  "use strict";
  var table = document.getElementById("matrices");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  var filter = document.getElementById("filter");
  var flaggedOnly = document.getElementById("flagged-only");
  var shown = document.getElementById("shown");
  var colIndex = {};
  for (var h = 0; h < headers.length; h++) { colIndex[headers[h].textContent] = h; }

  function cellKey(row, col, numeric) {
    var v = row.cells[col].getAttribute("data-sort");
    if (!numeric) { return v.toLowerCase(); }
    return v === "" ? NaN : parseFloat(v);
  }

  function sortBy(col, dir) {
    var numeric = headers[col].getAttribute("data-type") === "num";
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = cellKey(a, col, numeric), y = cellKey(b, col, numeric);
      if (numeric) {  // empty (NaN) values always last
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
        return dir * (x - y);
      }
      return dir * (x < y ? -1 : x > y ? 1 : 0);
    });
    for (var i = 0; i < rows.length; i++) { tbody.appendChild(rows[i]); }
    for (var j = 0; j < headers.length; j++) { headers[j].classList.remove("asc", "desc"); }
    headers[col].classList.add(dir > 0 ? "asc" : "desc");
  }

  function isFlagged(row) {
    var w = colIndex.warning, t = colIndex.rand_num_spikes;
    var warn = w === undefined ? "" : row.cells[w].textContent;
    var traps = t === undefined ? 0 : parseFloat(row.cells[t].textContent || "0");
    return warn !== "" || traps > 0;
  }

  function applyFilter() {
    var q = filter.value.trim().toLowerCase();
    var n = 0;
    for (var i = 0; i < tbody.rows.length; i++) {
      var row = tbody.rows[i];
      var ok = (q === "" || row.textContent.toLowerCase().indexOf(q) >= 0) &&
               (!flaggedOnly || !flaggedOnly.checked || isFlagged(row));
      row.hidden = !ok;
      if (ok) { n++; }
    }
    shown.textContent = String(n);
  }

  for (var k = 0; k < headers.length; k++) {
    headers[k].addEventListener("click", function (ev) {
      var col = parseInt(ev.currentTarget.getAttribute("data-col"), 10);
      sortBy(col, ev.currentTarget.classList.contains("asc") ? -1 : 1);
    });
  }
  filter.addEventListener("input", applyFilter);
  if (flaggedOnly) { flaggedOnly.addEventListener("change", applyFilter); }
})();
