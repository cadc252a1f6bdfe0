// The igv.js view of one bams3 dataset (bams3 serve). The server renders the page with its
// configuration in #bams3-config; reads come from the server's own htsget endpoint.
// window.bams3 exposes the browser and how many times the alignment track loaded (tests).
(function () {
  "use strict";
  const cfg = JSON.parse(document.getElementById("bams3-config").textContent);
  const errorBox = document.getElementById("error");
  const form = document.getElementById("locus-form");
  const input = document.getElementById("locus");
  const state = window.bams3 = {browser: null, loads: 0, error: null};
  const UNREACHABLE = "The bams3 server at " + location.origin + " cannot be reached: it may have stopped " +
    "or the network is down. Start it again (bams3 serve ...) and reload this page.";

  function showError(message) {
    state.error = message;
    errorBox.textContent = message;
  }

  async function reachable() {
    try {
      const r = await fetch("/reads/service-info", {cache: "no-store"});
      return r.ok;
    } catch (e) {
      return false;
    }
  }

  // an error: say so, or that the server is gone if it is
  async function report(message) {
    showError((await reachable()) ? message : UNREACHABLE);
  }

  // the locus box asks the server (which checks contig and width) for the page of that locus
  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    if (!(await reachable())) {
      showError(UNREACHABLE);
      return;
    }
    form.submit();
  });

  const track = {
    type: "alignment",
    format: "bam",
    sourceType: "htsget",
    url: location.origin + cfg.readsPath,
    name: cfg.id,
    visibilityWindow: cfg.maxLocus,
    samplingDepth: 10000,                                  // igv.js's maximum: show every read
    filter: {vendorFailed: false, duplicates: false},      // as samtools view: QC-failed and duplicates too
  };

  igv.createBrowser(document.getElementById("igv"), {
    reference: cfg.reference,
    locus: cfg.locus,
    tracks: [track],
    showChromosomeWidget: true,
    loadDefaultGenomes: false,                             // offline: no genome list from igv.org
  }).then(function (browser) {
    state.browser = browser;
    state.loads += 1;                                      // createBrowser resolves once the locus has loaded
    const present = browser.alert.present.bind(browser.alert);
    browser.alert.present = function (alert, callback) {
      report(alert && alert.message ? alert.message : String(alert));
      present(alert, callback);
    };
    browser.on("featuresloaded", function () {
      state.loads += 1;
    });
    browser.on("locuschange", function (frames) {
      const locus = frames && frames[0] && frames[0].getLocusString ? frames[0].getLocusString() : null;
      if (locus) {
        input.value = locus;
        history.replaceState(null, "", location.pathname + "?locus=" + encodeURIComponent(locus));
      }
    });
  }).catch(function (e) {
    report("igv.js could not open the dataset: " + (e && e.message ? e.message : e));
  });
})();
