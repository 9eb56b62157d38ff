/** @type {AppTypes.Config} */
// OHIF 3.13 configuration for dicom-node: one DICOMweb data source, Orthanc, on the same origin.
//
// Served as /app-config.js in place of the bundle's own file, by nginx in docker compose
// (deploy/nginx/ohif.conf) and by deploy/local/ohif_proxy.py on machines without Docker. Both
// proxy /dicom-web and /wado to Orthanc, because Orthanc 1.10 sends no CORS headers, and split
// the comma-separated `includefield` values OHIF sends, which the DICOMweb plugin 1.7 ignores.
window.config = {
  name: 'dicom-node',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {
    // Measurements of reports made elsewhere (the node's TID 1500 SR among them) are shown
    // read-only on the image their planar ROI outlines. OHIF labels them with the measurement's
    // concept only ("Volume: 1839.00 mm3"); name the tracked structure as well, and skip a
    // measurement that has no image location instead of failing the whole report on it.
    onBeforeSRAddMeasurement: {
      $set: ({ measurement }) => {
        const name = measurement.TrackingIdentifier || '';
        // OHIF's own reports track "Cornerstone3DTools@^0.1.0:<Tool>": leave those alone.
        if (name && !name.includes('@') && !measurement.structureNamed) {
          const title = name.charAt(0).toUpperCase() + name.slice(1);
          // Measured values only: coded finding sites are labelled by their code value.
          measurement.labels = (measurement.labels || []).map((entry) =>
            /^\d+$/.test(String(entry.label))
              ? entry
              : { ...entry, label: `${title} ${String(entry.label).toLowerCase()}` });
          measurement.structureNamed = true;
        }
        if (!measurement.coords || measurement.coords.length === 0) {
          measurement.coords = [{}];
        }
        return measurement;
      },
    },
  },
  showStudyList: true,
  // Orthanc's /dicom-web has no CORS headers and needs none here: everything is same-origin.
  showWarningMessageForCrossOrigin: false,
  // Headless and remote-desktop browsers render with the CPU; say so instead of failing silently.
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumberOfWebWorkers: 3,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'dicom-node PACS (Orthanc)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        // The proxy splits includefield, but OHIF still asks for fewer fields this way.
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
